#if canImport(Glibc)
import Glibc
#endif

/// A clock's time in nanoseconds (CLOCK_MONOTONIC, a thread's CPU clock: CLOCK_THREAD_CPUTIME_ID for the calling
/// thread's, `pthread_getcpuclockid` for another's); 0 if the clock cannot be read.
func clockNanos(_ clock: clockid_t) -> UInt64 {
    var ts = timespec()
    guard clock_gettime(clock, &ts) == 0 else { return 0 }
    return UInt64(ts.tv_sec) &* 1_000_000_000 &+ UInt64(ts.tv_nsec)
}
