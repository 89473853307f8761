/* uplinkctl_passwd.c - `uplinkctl passwd FILE USER` (see uplinkctl_passwd.h). */
#include "uplinkctl_passwd.h"

#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <termios.h>
#include <unistd.h>

#include <openssl/crypto.h>

#include "access.h"

#define PASSWORD_MAX 1024

static void usage(FILE *out)
{
    fprintf(out,
            "Usage: uplinkctl passwd [--iterations N] FILE USER\n"
            "Add or change USER in the password file FILE (local.password_file).\n"
            "The password is read from standard input: typed twice without echo on a\n"
            "terminal, or the first line of a pipe (printf '%%s\\n' \"$PW\" | uplinkctl ...).\n"
            "FILE is replaced atomically and keeps its owner, group and mode; a new file\n"
            "gets the directory's group and mode 0640.\n\n"
            "Options:\n"
            "  -i, --iterations N  PBKDF2-SHA512 iterations (default %u, at least %u)\n",
            ACCESS_PBKDF2_DEFAULT_ITERATIONS, ACCESS_PBKDF2_MIN_ITERATIONS);
}

/* One line from @in without its line ending; -1 on EOF, a too long line or
 * an error. */
static int read_line(FILE *in, char *buf, size_t size)
{
    size_t len;

    if (!fgets(buf, (int)size, in))
        return -1;
    len = strlen(buf);
    if (len == size - 1 && buf[len - 1] != '\n')
        return -1;
    while (len && (buf[len - 1] == '\n' || buf[len - 1] == '\r'))
        buf[--len] = '\0';
    return 0;
}

/* Prompt on the terminal with echo off; the previous mode comes back even
 * when reading fails. */
static int read_tty(const char *prompt, char *buf, size_t size)
{
    struct termios old, quiet;
    int rc;

    fputs(prompt, stderr);
    fflush(stderr);
    if (tcgetattr(STDIN_FILENO, &old) < 0)
        return -1;
    quiet = old;
    quiet.c_lflag &= ~(tcflag_t)(ECHO | ECHONL);
    quiet.c_lflag |= ICANON;
    if (tcsetattr(STDIN_FILENO, TCSAFLUSH, &quiet) < 0)
        return -1;
    rc = read_line(stdin, buf, size);
    tcsetattr(STDIN_FILENO, TCSAFLUSH, &old);
    fputc('\n', stderr);
    return rc;
}

int uplinkctl_passwd_main(int argc, char **argv)
{
    static const struct option options[] = {
        {"iterations", required_argument, NULL, 'i'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    char password[PASSWORD_MAX + 2], again[PASSWORD_MAX + 2];
    unsigned long iterations = 0;
    char why[512];
    char *line = NULL, *end;
    int opt, rc, status = 1;

    optind = 1;
    while ((opt = getopt_long(argc, argv, "+i:h", options, NULL)) != -1) {
        switch (opt) {
        case 'i':
            errno = 0;
            iterations = strtoul(optarg, &end, 10);
            if (errno || *end || iterations < ACCESS_PBKDF2_MIN_ITERATIONS ||
                iterations > ACCESS_PBKDF2_MAX_ITERATIONS) {
                fprintf(stderr, "uplinkctl passwd: --iterations must be a number from %u to %u\n",
                        ACCESS_PBKDF2_MIN_ITERATIONS, ACCESS_PBKDF2_MAX_ITERATIONS);
                return 2;
            }
            break;
        case 'h':
            usage(stdout);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    if (argc - optind != 2) {
        usage(stderr);
        return 2;
    }
    if (isatty(STDIN_FILENO)) {
        if (read_tty("Password: ", password, sizeof(password)) < 0 ||
            read_tty("Password again: ", again, sizeof(again)) < 0) {
            fprintf(stderr, "uplinkctl passwd: no password read (at most %d bytes)\n",
                    PASSWORD_MAX);
            goto out;
        }
        if (strcmp(password, again) != 0) {
            fprintf(stderr, "uplinkctl passwd: the passwords differ; nothing changed\n");
            goto out;
        }
    } else if (read_line(stdin, password, sizeof(password)) < 0) {
        fprintf(stderr,
                "uplinkctl passwd: no password on standard input (one line, at most %d bytes)\n",
                PASSWORD_MAX);
        goto out;
    }
    if (password[0] == '\0') {
        fprintf(stderr, "uplinkctl passwd: empty password refused\n");
        goto out;
    }
    rc = access_passwd_line(argv[optind + 1], password, strlen(password), (unsigned)iterations,
                            &line, why, sizeof(why));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl passwd: %s\n", why);
        goto out;
    }
    rc = access_passwd_file_set(argv[optind], line, why, sizeof(why));
    if (rc < 0) {
        fprintf(stderr, "uplinkctl passwd: %s\n", why);
        goto out;
    }
    fprintf(stderr, "uplinkctl passwd: %s: password of \"%s\" set (reload uplinkd to apply)\n",
            argv[optind], argv[optind + 1]);
    status = 0;
out:
    OPENSSL_cleanse(password, sizeof(password));
    OPENSSL_cleanse(again, sizeof(again));
    if (line) {
        OPENSSL_cleanse(line, strlen(line));
        free(line);
    }
    return status;
}
