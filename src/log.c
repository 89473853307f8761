/* log.c - journald or stderr sink with repeat folding. */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <systemd/sd-journal.h>

static int max_level = LOG_INFO;
static bool use_journal;

/* Repeat folding: the last record's text and how often it came again. */
static struct {
    char key[1400]; /* uplink|child|text: what must match to fold */
    char text[1024];
    int level;
    unsigned repeats;
    struct timespec first;
} last;

static const char *const level_names[] = {
    [LOG_EMERG] = "emergency", [LOG_ALERT] = "alert",     [LOG_CRIT] = "critical",
    [LOG_ERR] = "error",       [LOG_WARNING] = "warning", [LOG_NOTICE] = "notice",
    [LOG_INFO] = "info",       [LOG_DEBUG] = "debug",
};

/* systemd sets JOURNAL_STREAM=DEV:INODE for the stream it connected to our
 * stderr; only when that still is our stderr do we talk to journald directly
 * (a child that redirected stderr must keep writing to its file). */
static bool stderr_is_journal(void)
{
    const char *env = getenv("JOURNAL_STREAM");
    unsigned long long dev, ino;
    struct stat st;

    if (env == NULL || sscanf(env, "%llu:%llu", &dev, &ino) != 2)
        return false;
    if (fstat(STDERR_FILENO, &st) < 0)
        return false;
    return (unsigned long long)st.st_dev == dev && (unsigned long long)st.st_ino == ino;
}

void log_init(int level)
{
    max_level = level;
    use_journal = stderr_is_journal();
    memset(&last, 0, sizeof(last));
}

void log_set_level(int level)
{
    max_level = level;
}

int log_get_level(void)
{
    return max_level;
}

const char *log_level_name(int level)
{
    if (level < LOG_EMERG || level > LOG_DEBUG)
        return "unknown";
    return level_names[level];
}

int log_level_parse(const char *name)
{
    if (name == NULL)
        return -1;
    for (int level = LOG_ERR; level <= LOG_DEBUG; level++) {
        if (strcmp(name, level_names[level]) == 0)
            return level;
    }
    if (strcmp(name, "warn") == 0)
        return LOG_WARNING;
    return -1;
}

static void write_record(int level, const char *file, int line, const char *func,
                         const char *uplink, const char *child, const char *text)
{
    if (use_journal) {
        char code_line[16];
        snprintf(code_line, sizeof(code_line), "%d", line);
        /* sd_journal_send takes "FIELD=value" formats; empty context fields
         * are sent as empty strings rather than left out, which journald
         * accepts and which keeps this one call. */
        sd_journal_send("MESSAGE=%s", text, "PRIORITY=%d", level, "CODE_FILE=%s", file,
                        "CODE_LINE=%s", code_line, "CODE_FUNC=%s", func, "UPLINK=%s",
                        uplink ? uplink : "", "CHILD=%s", child ? child : "",
                        "SYSLOG_IDENTIFIER=uplinkd", NULL);
        return;
    }
    char prefix[160] = "";
    if (uplink != NULL && child != NULL)
        snprintf(prefix, sizeof(prefix), "uplink %s: child %s: ", uplink, child);
    else if (uplink != NULL)
        snprintf(prefix, sizeof(prefix), "uplink %s: ", uplink);
    else if (child != NULL)
        snprintf(prefix, sizeof(prefix), "child %s: ", child);
    fprintf(stderr, "uplinkd[%ld]: %s: %s%s\n", (long)getpid(), log_level_name(level), prefix,
            text);
}

static void flush_repeats(const char *file, int line, const char *func)
{
    if (last.repeats == 0)
        return;
    char text[1100];
    snprintf(text, sizeof(text), "last message repeated %u times: %s", last.repeats, last.text);
    write_record(last.level, file, line, func, NULL, NULL, text);
    last.repeats = 0;
    last.key[0] = '\0';
}

void log_emit(int level, const char *file, int line, const char *func, const char *uplink,
              const char *child, const char *fmt, ...)
{
    if (level > max_level)
        return;

    int saved_errno = errno;
    char text[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(text, sizeof(text), fmt, ap);
    va_end(ap);

    char key[sizeof(last.key)];
    snprintf(key, sizeof(key), "%s|%s|%s", uplink ? uplink : "", child ? child : "", text);

    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    if (strcmp(key, last.key) == 0 && level == last.level && now.tv_sec - last.first.tv_sec < 1) {
        last.repeats++;
        errno = saved_errno;
        return;
    }
    flush_repeats(file, line, func);
    snprintf(last.key, sizeof(last.key), "%s", key);
    snprintf(last.text, sizeof(last.text), "%s", text);
    last.level = level;
    last.first = now;

    write_record(level, file, line, func, uplink, child, text);
    errno = saved_errno;
}
