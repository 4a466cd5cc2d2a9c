/* range.h — named ranges on a profiler's timeline: NVTX ranges, which
 * Nsight Systems (`nsys profile`) draws per thread above the CUDA kernels
 * they launched, as it draws PyTorch's and Megatron's. The engine marks a
 * step, its phases by the timers' names (train.timing_log_level's) and each
 * micro-batch's forward and backward, a validation and a checkpoint save.
 *
 * Ranges nest per thread (push, pop). With no profiler attached a call is
 * NVTX's own check of a function pointer (plus the formatting of its name);
 * a build without the NVTX headers (they come with the CUDA toolkit)
 * compiles them to nothing. Never fails, never blocks. */
#ifndef MT_RANGE_H
#define MT_RANGE_H

/* Opens a range named by the format, nested in this thread's open ones. */
void mt_range_push(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
/* Closes this thread's innermost open range; none open: nothing. */
void mt_range_pop(void);
/* This thread's open ranges, and closing them down to depth: a function
 * that returns early on an error closes what it opened in one place. */
int mt_range_depth(void);
void mt_range_pop_to(int depth);
/* Loads the profiler's tool (or settles on none) now, on the calling
 * thread: call it before starting the threads that push ranges. NVTX does
 * it at a process's first call on whichever thread makes it, and threads
 * whose first calls meet then read its table of functions while another
 * writes it (one wins NVTX's compare-and-swap and the others wait, but the
 * table itself is plain memory: ThreadSanitizer reports it). */
void mt_range_init(void);
/* 1 when this build emits NVTX ranges. */
int mt_range_enabled(void);

#endif
