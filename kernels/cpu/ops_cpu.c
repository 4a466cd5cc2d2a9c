/* placeholder: being written */
#include "ops.h"
const mt_ops mt_cpu_ops = {.name = "cpu"};
