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
 * Errors come back as {"error":"words"}.
 */
#ifndef UPLINKD_CTL_PROTOCOL_H
#define UPLINKD_CTL_PROTOCOL_H

#define UPLINKD_CTL_DEFAULT_SOCKET "/run/uplinkd/control.sock"
#define UPLINKD_CTL_MAX_REQUEST    256

#endif
