/* comm_check.h — collective checks against a serial reference, shared by
 * test_comm (ranks as threads) and comm_worker (ranks as processes). Each rank
 * computes every other rank's input itself, so the reference needs no
 * communication. Inputs are small integers (exact in every dtype, whatever the
 * reduction order) except one random f32 case checked with a tolerance.
 *
 * Each returns 0, or -1 with a message in err.
 */
#ifndef MT_COMM_CHECK_H
#define MT_COMM_CHECK_H

#include <stddef.h>

#include "comm.h"

/* Every collective x every dtype x sum/max x counts 1, 7, 1031, out of
 * place (and in place for f32), then a random f32 all-reduce and a barrier. */
int check_collectives(mt_comm *c, char *err, size_t cap);

/* All-reduce and reduce-scatter over bytes of f32, every element checked. */
int check_large(mt_comm *c, size_t bytes, char *err, size_t cap);

/* Every rank sends three messages of odd sizes to rank+1 and receives from
 * rank-1: started (mt_comm_sendrecv_start) all at once, a started send
 * beside a blocking receive, then blocking with send/recv ordered by parity
 * and with sendrecv. */
int check_ring(mt_comm *c, char *err, size_t cap);

#endif
