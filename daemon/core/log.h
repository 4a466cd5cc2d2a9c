/* log.h — leveled logging to stderr.
 *
 * Under systemd (JOURNAL_STREAM set) lines carry sd-daemon "<N>" priority
 * prefixes and no timestamps, since journald stamps them; otherwise an ISO
 * time. Thread-safe; one write(2) per line so lines from threads never mix.
 */
#ifndef MT_LOG_H
#define MT_LOG_H

enum { MT_LOG_ERROR = 3, MT_LOG_WARN = 4, MT_LOG_INFO = 6, MT_LOG_DEBUG = 7 };

void mt_log_set_level(int level);
int mt_log_level(void);
/* Parses "error|warn|info|debug"; returns a level or -1. */
int mt_log_parse_level(const char *s);
void mt_log(int level, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

#define mt_log_error(...) mt_log(MT_LOG_ERROR, __VA_ARGS__)
#define mt_log_warn(...) mt_log(MT_LOG_WARN, __VA_ARGS__)
#define mt_log_info(...) mt_log(MT_LOG_INFO, __VA_ARGS__)
#define mt_log_debug(...) mt_log(MT_LOG_DEBUG, __VA_ARGS__)

#endif
