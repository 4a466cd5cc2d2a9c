/* staged_comm.h — mt_comm_* collectives on host buffers over a group whose
 * backend takes device memory (NCCL): each copies its buffers to the calling
 * thread's device, runs the collective there and copies the results back.
 * Started operations (reduce_start, sendrecv_start) keep their device copies
 * until their wait. For tests only: every call allocates and synchronises.
 */
#ifndef MT_STAGED_COMM_H
#define MT_STAGED_COMM_H

#include "comm.h"
#include "device.h"

/* The device the calling thread's staged calls put their buffers on. */
void staged_use_device(mt_device *d);

int staged_allreduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                     mt_comm_op op);
int staged_reduce_scatter(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                          mt_comm_op op);
int staged_allgather(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt);
int staged_broadcast(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int root);
int staged_reduce(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                  mt_comm_op op, int root);
int staged_reduce_start(mt_comm *c, const void *send, void *recv, size_t count, mt_comm_dtype dt,
                        mt_comm_op op, int root);
int staged_wait(mt_comm *c);
int staged_send(mt_comm *c, const void *buf, size_t count, mt_comm_dtype dt, int peer);
int staged_recv(mt_comm *c, void *buf, size_t count, mt_comm_dtype dt, int peer);
int staged_sendrecv(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                    size_t recv_count, int src, mt_comm_dtype dt);
int staged_sendrecv_start(mt_comm *c, const void *send, size_t send_count, int dst, void *recv,
                          size_t recv_count, int src, mt_comm_dtype dt, int *send_req,
                          int *recv_req);
int staged_p2p_wait(mt_comm *c, int req);

#endif
