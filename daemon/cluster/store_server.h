/* store_server.h — the rendezvous store's TCP server (proto/store-v1.md).
 *
 * The coordinator daemon hosts it inside its main libuv loop: keys and values
 * in memory, any number of clients, GET and WAIT requests parked until their
 * keys appear or their timers fire. Everything runs on the loop's thread; the
 * server never blocks it and never exits: a client that sends garbage gets an
 * error reply and loses its connection, everyone else is served as before.
 * mt_store_server_run_thread() runs one on a loop of its own, for tests and
 * tools.
 */
#ifndef MT_STORE_SERVER_H
#define MT_STORE_SERVER_H

struct uv_loop_s;
typedef struct mt_store_server mt_store_server;

/* Listens on host:port (port 0: the system picks one; see
 * mt_store_server_port) with handles on loop; call from the loop's thread.
 * The server serves as the loop runs. */
int mt_store_server_start(struct uv_loop_s *loop, const char *host, int port,
                          mt_store_server **out);

/* The port the server listens on. */
int mt_store_server_port(const mt_store_server *s);

typedef struct mt_store_server_stats {
  unsigned clients;   /* open connections */
  unsigned waiters;   /* parked GET and WAIT requests */
  unsigned long keys; /* keys stored */
} mt_store_server_stats;

/* From the loop's thread. */
void mt_store_server_get_stats(const mt_store_server *s, mt_store_server_stats *st);

/* Stops listening, drops every connection and parked request (their clients
 * see the connection close) and closes every handle; once the last one is
 * closed frees the server and calls closed(arg) (may be NULL) from the loop.
 * Call from the loop's thread; the loop must run on for the handles to close. */
void mt_store_server_stop(mt_store_server *s, void (*closed)(void *arg), void *arg);

/* A server on a loop and thread of its own. */
typedef struct mt_store_server_thread mt_store_server_thread;

int mt_store_server_run_thread(const char *host, int port, mt_store_server_thread **out);
int mt_store_server_thread_port(const mt_store_server_thread *t);
/* Stops the server, joins its thread and frees everything. */
void mt_store_server_thread_stop(mt_store_server_thread *t);

#endif
