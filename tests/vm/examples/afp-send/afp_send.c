/*
 * afp_send: sends COUNT Ethernet frames of LEN bytes (default 60) out of IFACE with an
 * AF_PACKET socket, through whatever driver the kernel has for it, then waits until the
 * interface's tx_packets counter (which virtio_net advances when the device has used a
 * frame) has grown by as many, and prints
 *
 *   VNET-VALUE sent=N bytes=B completed=C
 *
 * An example of a program that is not ours, for the VM runner (tests/vm/README.md,
 * "Testing your application in a VM image"). Build: gcc -static -O2 -o afp_send afp_send.c
 */
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static unsigned long long tx_packets(const char *ifname)
{
    char path[128];
    unsigned long long v = 0;
    snprintf(path, sizeof path, "/sys/class/net/%s/statistics/tx_packets", ifname);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    if (fscanf(f, "%llu", &v) != 1)
        v = 0;
    fclose(f);
    return v;
}

int main(int argc, char **argv)
{
    if (argc < 3) {
        fprintf(stderr, "usage: afp_send IFACE COUNT [LEN]\n");
        return 2;
    }
    const char *ifname = argv[1];
    long count = strtol(argv[2], NULL, 10);
    long len = argc > 3 ? strtol(argv[3], NULL, 10) : 60;
    if (count < 0 || len < 60 || len > 1514) {
        fprintf(stderr, "afp_send: COUNT >= 0 and 60 <= LEN <= 1514\n");
        return 2;
    }
    int fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: receives nothing */
    if (fd < 0) {
        perror("afp_send: socket(AF_PACKET)");
        return 1;
    }
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1);
    if (ioctl(fd, SIOCGIFINDEX, &ifr) < 0) {
        perror("afp_send: SIOCGIFINDEX");
        return 1;
    }
    int ifindex = ifr.ifr_ifindex;
    if (ioctl(fd, SIOCGIFHWADDR, &ifr) < 0) {
        perror("afp_send: SIOCGIFHWADDR");
        return 1;
    }
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof sll);
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ifindex;
    sll.sll_protocol = htons(0x88b5);
    if (bind(fd, (struct sockaddr *)&sll, sizeof sll) < 0) {
        perror("afp_send: bind");
        return 1;
    }
    unsigned char frame[1514];
    memset(frame, 0, sizeof frame);
    const unsigned char dst[6] = {0x02, 0, 0, 0, 0, 0x01};
    memcpy(frame, dst, 6);
    memcpy(frame + 6, ifr.ifr_hwaddr.sa_data, 6);
    frame[12] = 0x88; /* local experimental EtherType */
    frame[13] = 0xb5;

    unsigned long long before = tx_packets(ifname);
    long sent = 0, retries = 0;
    unsigned long long bytes = 0;
    while (sent < count) {
        frame[14] = (unsigned char)(sent >> 24);
        frame[15] = (unsigned char)(sent >> 16);
        frame[16] = (unsigned char)(sent >> 8);
        frame[17] = (unsigned char)sent;
        ssize_t n = send(fd, frame, (size_t)len, 0);
        if (n == len) {
            sent++;
            bytes += (unsigned long long)n;
        } else if (n < 0 && (errno == ENOBUFS || errno == EAGAIN || errno == EINTR)) {
            retries++; /* the device's queue is full: try again shortly */
            usleep(100);
        } else {
            perror("afp_send: send");
            break;
        }
    }
    /* Wait (at most 10 s) until the device has used every frame. */
    unsigned long long done = 0;
    for (int i = 0; i < 1000; i++) {
        done = tx_packets(ifname) - before;
        if (done >= (unsigned long long)sent)
            break;
        usleep(10000);
    }
    printf("afp_send: %ld frames of %ld bytes sent on %s (%ld retries)\n", sent, len, ifname, retries);
    printf("VNET-VALUE sent=%ld bytes=%llu completed=%llu\n", sent, bytes, done);
    close(fd);
    return sent == count ? 0 : 1;
}
