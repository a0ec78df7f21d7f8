/*
 * dpdk_latency: the round-trip probe of DPDK's own pair, for latency.sh's `dpdk-pair` row.
 *
 * Neither of DPDK 22.11's testpmds stamps frames (its latencystats library measures the
 * time a frame spends inside one application, rx to tx, not a round trip), so DPDK's
 * pair -- its virtio PMD in front of its vhost PMD -- had no latency row. This program is
 * the front-end half of that pair: DPDK's virtio-user PMD (net_virtio_user, the driver
 * under test) sends 64-byte UDP frames at a fixed rate to a vhost-user back-end that
 * returns every frame (DPDK's net_vhost in testpmd `io` mode), and measures each frame
 * that comes back. It does what our testpmd's `--latency --tx-pps` does (testpmd/src/
 * latency.rs), so the two rows differ only in the pair under test:
 *   - the stamp: 16 bytes after the Ethernet/IPv4/UDP headers (offset 42): "LT", a source
 *     id, a nonce, the sequence number (u32 LE) and the send time (u64 LE, ns of
 *     CLOCK_MONOTONIC), read once per burst on each side;
 *   - pacing: after t ns, t * pps / 1e9 frames may have been sent, at most a burst of 32
 *     at once; a frame the ring refuses gives its sequence number back;
 *   - one polling thread doing receive, then transmit, on one queue.
 * Percentiles here are exact (every sample is kept and sorted); testpmd's are the lower
 * bound of a 1/32-octave bucket (at most 3.1% low).
 *
 * Usage: dpdk_latency EAL-ARGS... -- PPS SECONDS
 *   e.g. dpdk_latency --lcores=0@0 --no-pci --file-prefix=lat -m 256 --single-file-segments \
 *        --vdev net_virtio_user0,path=/tmp/vhost.sock,queues=1 -- 10000 5
 * Output (stdout, one line, as testpmd's --stats-format json):
 *   {"type":"port_latency","port":0,"p50_ns":N,"p99_ns":N,"p999_ns":N,"max_ns":N,
 *    "samples":N,"lost":N,"sent":N}
 * Exit status 1 with one line on stderr on any setup error.
 *
 * Build: gcc -O2 dpdk_latency.c $(pkg-config --cflags --libs libdpdk) -o dpdk_latency
 */
#include <inttypes.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <rte_eal.h>
#include <rte_ethdev.h>
#include <rte_mbuf.h>

#define BURST 32
#define RING 256
#define FRAME 64
#define STAMP_AT 42
#define NONCE 0x5a
#define DRAIN_NS 200000000ull /* after the last send: wait this long for frames in flight */

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void die(const char *what)
{
	fprintf(stderr, "dpdk_latency: %s\n", what);
	exit(1);
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
	return (x > y) - (x < y);
}

/* The frame template: broadcast Ethernet, IPv4 (checksum filled), UDP without checksum. */
static void fill_template(uint8_t *f)
{
	static const uint8_t hdr[STAMP_AT] = {
		0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x02, 0x00, 0x00, 0x00, 0x00, 0x01, 0x08, 0x00,
		0x45, 0x00, 0x00, FRAME - 14, 0x00, 0x00, 0x00, 0x00, 0x40, 0x11, 0x00, 0x00,
		198, 18, 0, 1, 198, 18, 0, 2,
		0x04, 0x00, 0x04, 0x00, 0x00, FRAME - 34, 0x00, 0x00,
	};
	uint32_t sum = 0;
	int i;

	memset(f, 0, FRAME);
	memcpy(f, hdr, sizeof(hdr));
	for (i = 14; i < 34; i += 2)
		sum += (uint32_t)f[i] << 8 | f[i + 1];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	sum = ~sum & 0xffff;
	f[24] = sum >> 8;
	f[25] = sum & 0xff;
}

int main(int argc, char **argv)
{
	uint8_t tmpl[FRAME];
	struct rte_mempool *pool;
	struct rte_eth_conf conf;
	struct rte_mbuf *rx[BURST], *tx[BURST];
	uint64_t pps, secs, cap, nsamples = 0, sent = 0, got = 0, stale = 0;
	uint64_t *samples, start, end, t;
	uint16_t port = 0;
	int n, i;

	n = rte_eal_init(argc, argv);
	if (n < 0)
		die("rte_eal_init failed (see the EAL lines above)");
	argc -= n;
	argv += n;
	if (argc != 3)
		die("usage: dpdk_latency EAL-ARGS... -- PPS SECONDS");
	pps = strtoull(argv[1], NULL, 10);
	secs = strtoull(argv[2], NULL, 10);
	if (pps == 0 || pps > 100000000 || secs == 0 || secs > 600)
		die("PPS must be 1..100000000 and SECONDS 1..600");
	if (rte_eth_dev_count_avail() != 1)
		die("exactly one port expected (one --vdev net_virtio_user0,...)");
	cap = pps * (secs + 1) + BURST;
	samples = malloc(cap * sizeof(*samples));
	if (!samples)
		die("cannot allocate the sample array");

	pool = rte_pktmbuf_pool_create("lat", 8191, 256, 0, RTE_MBUF_DEFAULT_BUF_SIZE, rte_socket_id());
	if (!pool)
		die("rte_pktmbuf_pool_create failed");
	memset(&conf, 0, sizeof(conf));
	if (rte_eth_dev_configure(port, 1, 1, &conf) < 0)
		die("rte_eth_dev_configure failed");
	if (rte_eth_rx_queue_setup(port, 0, RING, rte_eth_dev_socket_id(port), NULL, pool) < 0)
		die("rte_eth_rx_queue_setup failed");
	if (rte_eth_tx_queue_setup(port, 0, RING, rte_eth_dev_socket_id(port), NULL) < 0)
		die("rte_eth_tx_queue_setup failed");
	if (rte_eth_dev_start(port) < 0)
		die("rte_eth_dev_start failed");
	fill_template(tmpl);

	start = now_ns();
	end = start + secs * 1000000000ull;
	for (;;) {
		/* Receive and measure: one clock read per burst. */
		n = rte_eth_rx_burst(port, 0, rx, BURST);
		t = now_ns();
		for (i = 0; i < n; i++) {
			const uint8_t *p = rte_pktmbuf_mtod(rx[i], const uint8_t *);
			uint64_t ts;

			if (rte_pktmbuf_data_len(rx[i]) >= STAMP_AT + 16 && p[STAMP_AT] == 'L' &&
			    p[STAMP_AT + 1] == 'T' && p[STAMP_AT + 3] == NONCE) {
				memcpy(&ts, p + STAMP_AT + 8, 8);
				if (nsamples < cap && ts <= t)
					samples[nsamples++] = t - ts;
				got++;
			} else {
				stale++;
			}
			rte_pktmbuf_free(rx[i]);
		}
		if (t >= end) {
			if (got == sent || t >= end + DRAIN_NS)
				break;
			continue;
		}
		/* Transmit what the pace allows now. */
		{
			uint64_t due = (uint64_t)((unsigned __int128)(t - start) * pps / 1000000000ull);
			uint64_t allow = due > sent ? due - sent : 0;
			uint16_t k, done;

			if (allow > BURST)
				allow = BURST;
			if (allow == 0 || rte_pktmbuf_alloc_bulk(pool, tx, allow) != 0)
				continue;
			for (k = 0; k < allow; k++) {
				uint8_t *f = rte_pktmbuf_mtod(tx[k], uint8_t *);
				uint32_t seq = (uint32_t)(sent + k);

				memcpy(f, tmpl, FRAME);
				f[STAMP_AT] = 'L';
				f[STAMP_AT + 1] = 'T';
				f[STAMP_AT + 2] = 0;
				f[STAMP_AT + 3] = NONCE;
				memcpy(f + STAMP_AT + 4, &seq, 4);
				memcpy(f + STAMP_AT + 8, &t, 8);
				tx[k]->data_len = FRAME;
				tx[k]->pkt_len = FRAME;
			}
			done = rte_eth_tx_burst(port, 0, tx, (uint16_t)allow);
			/* Refused frames give their sequence numbers back (as testpmd's do). */
			for (k = done; k < allow; k++)
				rte_pktmbuf_free(tx[k]);
			sent += done;
		}
	}
	rte_eth_dev_stop(port);
	rte_eth_dev_close(port);

	if (nsamples == 0)
		die("no frame came back");
	qsort(samples, nsamples, sizeof(*samples), cmp_u64);
	printf("{\"type\":\"port_latency\",\"port\":0,\"p50_ns\":%" PRIu64 ",\"p99_ns\":%" PRIu64
	       ",\"p999_ns\":%" PRIu64 ",\"max_ns\":%" PRIu64 ",\"samples\":%" PRIu64
	       ",\"lost\":%" PRIu64 ",\"sent\":%" PRIu64 ",\"stale\":%" PRIu64 "}\n",
	       samples[nsamples * 50 / 100], samples[nsamples * 99 / 100],
	       samples[nsamples * 999 / 1000], samples[nsamples - 1], nsamples,
	       sent > got ? sent - got : 0, sent, stale);
	fflush(stdout);
	free(samples);
	rte_eal_cleanup();
	return 0;
}
