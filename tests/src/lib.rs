//! Support for the cross-process and interop tests in `tests/tests/`: a process harness
//! for our binaries ([`harness`]), DPDK's testpmd as a peer ([`dpdk`]), and a raw
//! vhost-user front-end that writes rings by hand ([`rawfront`]); QEMU guests
//! running our driver through VFIO ([`vm`]) and the scenarios
//! the VM tests run in both IOMMU modes ([`vmtest`]); private network namespaces
//! ([`netns`]); reading the l2fwd example's output ([`l2fwd`]); the VM runner's scenario
//! files and checks ([`scenario`]) and runs ([`runner`], the `vm-runner` binary).
pub mod dpdk;
pub mod evildevice;
pub mod harness;
pub mod l2fwd;
pub mod netns;
pub mod rawfront;
pub mod runner;
pub mod scenario;
pub mod testpmd_proc;
pub mod vdfront;
pub mod vm;
pub mod vmtest;
