#include "threads.h"

#include <stdio.h>
#include <stdlib.h>

static char policy[64];

extern char **environ;

static void set_wait_policy(int argc, char **argv, char **envp) {
  (void)argc, (void)argv;
  /* libc has not published the environment yet this early; libgomp's
   * constructor reads it through environ, so point environ at it first. */
  if (!environ) environ = envp;
  const char *user = getenv("OMP_WAIT_POLICY");
  if (user && *user) {
    snprintf(policy, sizeof policy, "%s (OMP_WAIT_POLICY)", user);
  } else {
    setenv("OMP_WAIT_POLICY", "PASSIVE", 0);
    snprintf(policy, sizeof policy, "PASSIVE (set by mtnlg)");
  }
}

/* Runs before shared libraries' constructors, libgomp's included. Only an
 * executable may carry a preinit array; this object is linked into
 * executables through the static kernels library, pulled in by
 * mt_omp_wait_policy() which device.c references. */
__attribute__((section(".preinit_array"),
               used)) static void (*const preinit)(int, char **, char **) = set_wait_policy;

const char *mt_omp_wait_policy(void) {
  return policy[0] ? policy : "unknown (preinit did not run)";
}
