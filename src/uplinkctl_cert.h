/* uplinkctl_cert.h - the offline `uplinkctl cert create` and `uplinkctl
 * cert show` commands: a device key and a self-signed certificate or CSR
 * with the CN a cloud expects (Cumulocity and Azure: the device id; AWS: the
 * thing name), and a certificate's thumbprints and validity. */
#ifndef UPLINKD_UPLINKCTL_CERT_H
#define UPLINKD_UPLINKCTL_CERT_H

/**
 * uplinkctl_cert_main() - `uplinkctl cert create --cn ID --out DIR [--days N]
 * [--csr] [--force]` or `uplinkctl cert show FILE`; @argv[0] is "cert".
 * Returns the exit status: 0, 1 (failed: reason on stderr), 2 (usage).
 */
int uplinkctl_cert_main(int argc, char **argv);

/** uplinkctl_cert_show() - print what `cert show FILE` prints; 0 or 1. */
int uplinkctl_cert_show(const char *path);

#endif
