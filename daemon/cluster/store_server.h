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

#include <stddef.h>
#include <stdint.h>

struct uv_loop_s;
typedef struct mt_store_server mt_store_server;

/* What the server holds at most: keys, values and 64 bytes an entry. A
 * write past it is refused (NO_MEMORY, "the store is full", the figures);
 * one that frees room, a DELETE or a smaller value, always goes.
 *
 * Apart from it, the transient bytes: parked GET and WAIT requests (with
 * copies of their keys), the connections' receive buffers (a frame is
 * buffered whole, up to 64 MiB) and the replies queued for clients that the
 * kernel has not taken yet. A GET or WAIT that would take them past their
 * limit is answered NO_MEMORY and not parked; a frame whose buffer would, is
 * answered NO_MEMORY and its connection closed; a reply that would, on a
 * connection with replies still queued (a client not reading them), closes
 * that connection with a log line; one on a connection with nothing queued
 * always goes (so the limit is passed by at most one reply a connection). A
 * connection past max_conns is accepted and closed at once. */
typedef struct mt_store_server_limits {
  uint64_t max_bytes;           /* 0: MT_STORE_SERVER_MAX_BYTES */
  uint64_t max_transient_bytes; /* 0: max_bytes / 4, at least MT_STORE_SERVER_MIN_TRANSIENT_BYTES */
  unsigned max_conns;           /* 0: MT_STORE_SERVER_MAX_CONNS */
  /* the cluster key (copied), or none (key_bytes 0): with one, a connection
   * must send it (AUTH) before anything else; any other request first, or a
   * wrong key, is answered UNAUTHORIZED and the connection closed */
  const char *key;
  size_t key_bytes;
} mt_store_server_limits;
#define MT_STORE_SERVER_MAX_BYTES (16ull << 30)
/* Room for the read buffers of some 4000 connections (64 KiB each) or a few
 * of the largest frames, however small max_bytes is. */
#define MT_STORE_SERVER_MIN_TRANSIENT_BYTES (256ull << 20)
/* A daemon opens two connections (its own client and its ranks'): a job of
 * 560 nodes needs some 1120. */
#define MT_STORE_SERVER_MAX_CONNS 65536u

/* Listens on host:port (port 0: the system picks one; see
 * mt_store_server_port) with handles on loop; call from the loop's thread.
 * The server serves as the loop runs. limits may be NULL (the defaults). */
int mt_store_server_start(struct uv_loop_s *loop, const char *host, int port,
                          const mt_store_server_limits *limits, mt_store_server **out);

/* The port the server listens on. */
int mt_store_server_port(const mt_store_server *s);

typedef struct mt_store_server_stats {
  unsigned clients;         /* open connections */
  unsigned waiters;         /* parked GET and WAIT requests */
  unsigned long keys;       /* keys stored */
  uint64_t bytes;           /* held, as the limit counts them */
  uint64_t transient_bytes; /* held by parked requests, receive buffers and queued replies, as
                             * their limit counts */
  uint64_t refused;         /* connections closed at once: past max_conns, or no memory for them */
  uint64_t dropped;         /* connections closed for not reading their replies: those queued
                             * and the next would pass the transient limit, or 256 MiB */
  uint64_t max_bytes, max_transient_bytes; /* the limits in force */
  unsigned max_conns;
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

int mt_store_server_run_thread(const char *host, int port, const mt_store_server_limits *limits,
                               mt_store_server_thread **out);
int mt_store_server_thread_port(const mt_store_server_thread *t);
/* The server's stats, from any thread but the server's own and not after
 * mt_store_server_thread_stop returned: asks the server's loop and waits
 * (during a stop: the stats as the stop began). */
void mt_store_server_thread_get_stats(mt_store_server_thread *t, mt_store_server_stats *st);
/* Stops the server, joins its thread and frees everything. */
void mt_store_server_thread_stop(mt_store_server_thread *t);

#endif
