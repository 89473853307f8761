/* uplinkd/ctl.h - the control socket protocol, shared by uplinkd and uplinkctl.
 *
 * A client connects to the Unix stream socket (conf control.socket), writes
 * one command line terminated by '\n', and reads one JSON document
 * terminated by '\n'; then the daemon closes the connection.
 *
 * Commands:
 *   status   {"version":..., "pid":..., "state":..., "local_clients":N,
 *             "uplinks":[{"name":..., "host":..., "port":N, "state":...,
 *                         "last_error":..., "queued":N, "published":N,
 *                         "received":N, "dropped":N, "connects":N}],
 *             "router":{"forwarded":N,"rejected":N,"unrouted":N}}
 *   children {"children":[{"id":..., "messages":N, "last_seen":UNIX_S,
 *             "uplinks":[{"name":..., "registration":"done|pending|none"}]}]}
 *   reconnect NAME, rotate NAME   {"ok":true, "uplink":NAME, "action":VERB}
 *   reload-credentials [NAME]
 *            compare tls.cert/tls.key/tls.ca/auth.key on disk with what the
 *            session was set up with (every uplink, or NAME); reconnect the
 *            uplinks whose files changed and pass the start-up checks:
 *            {"uplinks":[{"name":..., "result":"changed|unchanged|refused",
 *                         "message":"words: what changed, or why refused"}]}
 *   jwt NAME {"uplink":NAME, "token":"JWT", "exp":UNIX_S}: the token the
 *            uplink would send if it connected now, signed by the daemon
 *            (its key, claims and clock check). The token is a credential:
 *            the socket's mode (0660, group uplinkd) is what guards it.
 * Errors come back as {"error":"words"}.
 */
#ifndef UPLINKD_CTL_PROTOCOL_H
#define UPLINKD_CTL_PROTOCOL_H

#define UPLINKD_CTL_DEFAULT_SOCKET "/run/uplinkd/control.sock"
#define UPLINKD_CTL_MAX_REQUEST    256

#endif
