/* uplinkctl_passwd.h - the offline `uplinkctl passwd` command, which writes
 * local.password_file (format in access.h and docs/configuration.md). */
#ifndef UPLINKD_UPLINKCTL_PASSWD_H
#define UPLINKD_UPLINKCTL_PASSWD_H

/**
 * uplinkctl_passwd_main() - `uplinkctl passwd [--iterations N] FILE USER`:
 * read a password from stdin (prompted twice without echo on a terminal, or
 * the first line of a pipe; never from the command line, where other users
 * could read it in /proc) and add or replace USER's line in FILE, written
 * atomically with mode 0600.
 * @argc, @argv: the command's own arguments, argv[0] being "passwd".
 * Returns the process exit status: 0, 1 (failed: reason on stderr) or 2
 * (usage error).
 */
int uplinkctl_passwd_main(int argc, char **argv);

#endif
