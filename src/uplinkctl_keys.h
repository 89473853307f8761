/* uplinkctl_keys.h - the offline `uplinkctl jwt` and `uplinkctl keygen`
 * commands (they need no running daemon). */
#ifndef UPLINKD_UPLINKCTL_KEYS_H
#define UPLINKD_UPLINKCTL_KEYS_H

#include <stdbool.h>

/**
 * uplinkctl_jwt_main() - `uplinkctl jwt --key SPEC [--alg ALG] [--aud AUD]
 * [--lifetime D] ...`: sign one token and print it on stdout; or
 * `uplinkctl jwt UPLINK [--config FILE]`: the token a configured uplink
 * would send now, from the running daemon over @socket_path, else (no
 * daemon listens) signed here from the configuration file.
 * @argc, @argv: the command's own arguments, argv[0] being "jwt".
 * @socket_path: uplinkctl's -s (or the default; borrowed); @socket_given:
 * -s was given; @json_output: uplinkctl's --json.
 * Returns the process exit status: 0, 1 (could not sign, unknown uplink,
 * no JWT auth: reason on stderr), 2 (usage error, daemon unreachable).
 */
int uplinkctl_jwt_main(int argc, char **argv, const char *socket_path, bool socket_given,
                       bool json_output);

/**
 * uplinkctl_keygen_main() - `uplinkctl keygen --type ec|rsa --out DIR`:
 * write a new key pair to DIR and print the public PEM, alg and kid.
 * @argc, @argv: as for uplinkctl_jwt_main(), argv[0] being "keygen".
 * Returns 0, 1 (failed: reason on stderr) or 2 (usage error).
 */
int uplinkctl_keygen_main(int argc, char **argv);

#endif
