/* store_server_main — a store server as a process of its own, for tests.
 *
 *   store_server_main [--host 127.0.0.1] [--port 0]
 *
 * Prints "port N" on stdout once it listens, serves until SIGTERM or SIGINT,
 * then closes every connection and exits 0. Exit 1 when it cannot listen.
 */
#include "err.h"
#include "store_server.h"

#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <uv.h>

static mt_store_server *server;
static uv_signal_t sigterm, sigint;

static void on_signal(uv_signal_t *h, int signum) {
  (void)h, (void)signum;
  if (server) mt_store_server_stop(server, NULL, NULL);
  server = NULL;
  uv_close((uv_handle_t *)&sigterm, NULL);
  uv_close((uv_handle_t *)&sigint, NULL);
}

int main(int argc, char **argv) {
  const char *host = "127.0.0.1";
  int port = 0;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--host") && i + 1 < argc) {
      host = argv[++i];
    } else if (!strcmp(argv[i], "--port") && i + 1 < argc) {
      port = atoi(argv[++i]);
    } else {
      fprintf(stderr, "usage: %s [--host HOST] [--port PORT]\n", argv[0]);
      return 2;
    }
  }
  signal(SIGPIPE, SIG_IGN); /* a client gone mid-reply is EPIPE, not death */
  uv_loop_t *loop = uv_default_loop();
  if (mt_store_server_start(loop, host, port, NULL, &server)) {
    fprintf(stderr, "store_server_main: %s\n", mt_errmsg());
    return 1;
  }
  uv_signal_init(loop, &sigterm);
  uv_signal_init(loop, &sigint);
  uv_signal_start(&sigterm, on_signal, SIGTERM);
  uv_signal_start(&sigint, on_signal, SIGINT);
  printf("port %d\n", mt_store_server_port(server));
  fflush(stdout);
  uv_run(loop, UV_RUN_DEFAULT);
  uv_loop_close(loop);
  return 0;
}
