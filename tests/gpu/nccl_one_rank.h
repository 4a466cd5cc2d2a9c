/* nccl_one_rank.h — the NCCL backend of the comm layer on one device: what
 * one GPU can show of daemon/comm/nccl.c (NCCL refuses two ranks on one GPU;
 * one rank is a real communicator, with send and receive to itself).
 * test_nccl_gpu runs it on cuda:0 against the real libnccl; test_nccl_emu on
 * the emulator, so CI keeps it working.
 */
#ifndef MT_NCCL_ONE_RANK_H
#define MT_NCCL_ONE_RANK_H

#include "device.h"
#include "store.h"

/* Groups of one rank on d (a CUDA device), bootstrapped through store under
 * keys starting with prefix. One line per check on stdout, "ok  " or
 * "FAIL" first; returns how many failed. */
int nccl_one_rank_checks(mt_device *d, mt_store *store, const char *prefix);

#endif
