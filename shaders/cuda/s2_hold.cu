// Holds the stream for `ns` nanoseconds of the GPU's global timer (src/cuda/context.rs, `time_events`): the
// timed iterations are enqueued behind it, so that they run back to back as a busy GPU runs them and their
// events time the GPU's work rather than the host's submissions. One thread; it sleeps between reads.
extern "C" __global__ void s2_hold(unsigned long long ns) {
    unsigned long long t0, t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    do {
        __nanosleep(2000);
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    } while (t - t0 < ns);
}
