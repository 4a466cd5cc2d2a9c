/* threads.h — how the CPU backend's OpenMP threads wait.
 *
 * libgomp reads OMP_WAIT_POLICY once, in its constructor, before main(). Its
 * default spins after every parallel region, which on a busy or shared
 * machine (two tests at once on 2 cores, a data loader, another rank) turns
 * each barrier into a lost time slice: the tiny model ran 5x slower that way.
 * Every program that links the CPU backend therefore sets
 * OMP_WAIT_POLICY=PASSIVE from the ELF preinit array, which runs before any
 * library's constructor; a value the user set is kept.
 */
#ifndef MT_THREADS_H
#define MT_THREADS_H

/* "PASSIVE (set by mtnlg)", "ACTIVE (OMP_WAIT_POLICY)", ... */
const char *mt_omp_wait_policy(void);

#endif
