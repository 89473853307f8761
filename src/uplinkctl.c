/* uplinkctl.c - command-line client of the uplinkd control socket.
 *
 * Usage: uplinkctl [-s SOCKET] [status]
 * Sends one command line, prints the daemon's JSON answer. Exit status: 0 on
 * an answer, 1 when the daemon answered with an error, 2 when it could not
 * be reached.
 */
#include <errno.h>
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "config.h"
#include "uplinkctl_keys.h"
#include "uplinkctl_passwd.h"
#include "uplinkd/ctl.h"

static void usage(FILE *out)
{
    fprintf(out, "Usage: uplinkctl [-s SOCKET] [COMMAND]\n"
                 "Ask a running uplinkd over its control socket.\n\n"
                 "Commands:\n"
                 "  status     state of every uplink, queue depths, counters (JSON; default)\n"
                 "  jwt        sign a JWT offline and print it (uplinkctl jwt --help)\n"
                 "  keygen     write a new key pair, print its public key and kid\n"
                 "  passwd     add or change a user of local.password_file (passwd FILE USER)\n\n"
                 "Options:\n"
                 "  -s, --socket PATH  control socket (default " UPLINKD_CTL_DEFAULT_SOCKET ")\n"
                 "  -h, --help         this text\n"
                 "  -V, --version      print the version\n");
}

static int connect_socket(const char *path)
{
    struct sockaddr_un addr = {.sun_family = AF_UNIX};

    if (strlen(path) >= sizeof(addr.sun_path)) {
        fprintf(stderr, "uplinkctl: socket path too long: %s\n", path);
        return -1;
    }
    strcpy(addr.sun_path, path);
    int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        fprintf(stderr, "uplinkctl: socket: %s\n", strerror(errno));
        return -1;
    }
    if (connect(fd, (struct sockaddr *)&addr, sizeof(addr)) < 0) {
        fprintf(stderr,
                "uplinkctl: cannot reach uplinkd at %s: %s\n"
                "  (is uplinkd running? is control.socket in its config this path? use -s)\n",
                path, strerror(errno));
        close(fd);
        return -1;
    }
    return fd;
}

int main(int argc, char **argv)
{
    static const struct option options[] = {
        {"socket", required_argument, NULL, 's'},
        {"help", no_argument, NULL, 'h'},
        {"version", no_argument, NULL, 'V'},
        {NULL, 0, NULL, 0},
    };
    const char *socket_path = UPLINKD_CTL_DEFAULT_SOCKET;
    int opt;

    /* "+": options after the command belong to the command. */
    while ((opt = getopt_long(argc, argv, "+s:hV", options, NULL)) != -1) {
        switch (opt) {
        case 's':
            socket_path = optarg;
            break;
        case 'h':
            usage(stdout);
            return 0;
        case 'V':
            printf("uplinkctl %s\n", UPLINKD_VERSION);
            return 0;
        default:
            usage(stderr);
            return 2;
        }
    }
    const char *command = optind < argc ? argv[optind] : "status";
    /* Offline commands: no daemon needed. */
    if (strcmp(command, "jwt") == 0)
        return uplinkctl_jwt_main(argc - optind, argv + optind);
    if (strcmp(command, "keygen") == 0)
        return uplinkctl_keygen_main(argc - optind, argv + optind);
    if (strcmp(command, "passwd") == 0)
        return uplinkctl_passwd_main(argc - optind, argv + optind);
    if (strcmp(command, "status") != 0) {
        fprintf(stderr, "uplinkctl: unknown command \"%s\" (known: status, jwt, keygen, passwd)\n", command);
        return 2;
    }

    int fd = connect_socket(socket_path);
    if (fd < 0)
        return 2;
    char request[UPLINKD_CTL_MAX_REQUEST];
    int n = snprintf(request, sizeof(request), "%s\n", command);
    if (write(fd, request, (size_t)n) != n) {
        fprintf(stderr, "uplinkctl: write to %s: %s\n", socket_path, strerror(errno));
        close(fd);
        return 2;
    }

    size_t cap = 4096, len = 0;
    char *answer = malloc(cap);
    for (;;) {
        if (answer == NULL) {
            fprintf(stderr, "uplinkctl: out of memory\n");
            close(fd);
            return 2;
        }
        ssize_t got = read(fd, answer + len, cap - len - 1);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        len += (size_t)got;
        if (len + 1 == cap) {
            cap *= 2;
            char *grown = realloc(answer, cap);
            if (grown == NULL)
                free(answer);
            answer = grown;
        }
    }
    close(fd);
    answer[len] = '\0';
    if (len == 0) {
        fprintf(stderr, "uplinkctl: uplinkd closed the connection without an answer\n");
        free(answer);
        return 2;
    }
    fputs(answer, stdout);
    int rc = strncmp(answer, "{\"error\"", 8) == 0 ? 1 : 0;
    free(answer);
    return rc;
}
