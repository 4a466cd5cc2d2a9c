/* control_priv.h — what control.c and metrics.c share and no one else sees. */
#ifndef MT_CONTROL_PRIV_H
#define MT_CONTROL_PRIV_H

#include "control.h"

/* Requests answered with this status since start (0 for c NULL). */
unsigned long mt__control_count(const mt_control *c, int status);
/* Connections closed for a request past the whole-request deadline. */
unsigned long mt__control_cut(const mt_control *c);

#endif
