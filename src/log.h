/* log.h - logging to journald (structured fields) or stderr.
 *
 * When JOURNAL_STREAM names our stderr, records go to journald with
 * PRIORITY, CODE_FILE/CODE_LINE/CODE_FUNC and, where given, UPLINK= and
 * CHILD=. Otherwise one line per record on stderr:
 *   "uplinkd[PID]: <level>: [uplink NAME: ][child ID: ]message".
 * Identical messages repeated within one second are folded into a
 * "... repeated N times" line so a flapping link cannot flood the journal.
 */
#ifndef UPLINKD_LOG_H
#define UPLINKD_LOG_H

#include <syslog.h> /* LOG_ERR, LOG_WARNING, LOG_NOTICE, LOG_INFO, LOG_DEBUG */

/**
 * log_init() - choose the sink (journald or stderr) and the maximum level.
 * @level: syslog priority; records above it are dropped.
 */
void log_init(int level);

/** log_set_level() - change the maximum level (reload, -v). */
void log_set_level(int level);

/** log_get_level() - the current maximum level. */
int log_get_level(void);

/** log_level_name() - "error", "warning", ... for a syslog priority. */
const char *log_level_name(int level);

/**
 * log_level_parse() - syslog priority for "error", "warning", "notice",
 * "info" or "debug"; -1 for anything else.
 */
int log_level_parse(const char *name);

/**
 * log_emit() - write one record. Use the macros below instead.
 * @uplink, @child: optional context (NULL when not relevant), borrowed.
 */
void log_emit(int level, const char *file, int line, const char *func, const char *uplink,
              const char *child, const char *fmt, ...) __attribute__((format(printf, 7, 8)));

#define log_err(...)    log_emit(LOG_ERR, __FILE__, __LINE__, __func__, NULL, NULL, __VA_ARGS__)
#define log_warn(...)   log_emit(LOG_WARNING, __FILE__, __LINE__, __func__, NULL, NULL, __VA_ARGS__)
#define log_notice(...) log_emit(LOG_NOTICE, __FILE__, __LINE__, __func__, NULL, NULL, __VA_ARGS__)
#define log_info(...)   log_emit(LOG_INFO, __FILE__, __LINE__, __func__, NULL, NULL, __VA_ARGS__)
#define log_debug(...)  log_emit(LOG_DEBUG, __FILE__, __LINE__, __func__, NULL, NULL, __VA_ARGS__)

/* With an uplink name as context (UPLINK= field in the journal). */
#define log_uplink(level, name, ...)                                                               \
    log_emit(level, __FILE__, __LINE__, __func__, name, NULL, __VA_ARGS__)
/* With a child device id as context (CHILD= field in the journal). */
#define log_child(level, uplink, child, ...)                                                       \
    log_emit(level, __FILE__, __LINE__, __func__, uplink, child, __VA_ARGS__)

#endif
