/* uplink_explain.c - why a connection attempt failed, in words
 * (uplink_int.h): CONNACK codes, errno, the TLS failure OpenSSL reported, a
 * refused JWT with the profile's checklist. Calls nothing of the uplink.
 */
#include "uplink_int.h"

void uplink_set_error(struct uplink *uplink, const char *text)
{
    snprintf(uplink->last_error, sizeof(uplink->last_error), "%s", text);
}

void uplink_conn_fail(struct uplink_conn *conn, const char *fmt, ...)
{
    va_list ap;

    if (conn->failed)
        return;
    conn->failed = true;
    va_start(ap, fmt);
    vsnprintf(conn->error, sizeof(conn->error), fmt, ap);
    va_end(ap);
}

/* --- explaining failures ------------------------------------------------- */

static const char *connack_text(int rc)
{
    /* MQTT 3.1.1 §3.2.2.3 */
    switch (rc) {
    case 1:
        return "unacceptable protocol version (the broker does not speak MQTT 3.1.1)";
    case 2:
        return "identifier rejected (check client_id)";
    case 3:
        return "server unavailable (the broker is up but the MQTT service is not; try later)";
    case 4:
        return "bad user name or password - check auth.username/password";
    case 5:
        return "not authorized (the broker does not let these credentials or this client "
               "certificate connect; check auth and tls.cert)";
    default:
        return "unknown return code";
    }
}

const char *uplink_errno_hint(int err)
{
    switch (err) {
    case ECONNREFUSED:
        return " (nothing listens there: check host and port, and that the broker runs)";
    case ENETUNREACH:
    case EHOSTUNREACH:
        return " (no route: check the network connection)";
    case ETIMEDOUT:
        return " (no answer: a firewall may drop the packets)";
    default:
        return "";
    }
}

/* The reason part of the last "OpenSSL Error[n]: error:XXXX:lib:func:reason". */
static void captured_openssl_reason(const struct uplink_conn *conn, char *out, size_t size)
{
    const char *line = NULL, *p = conn->captured, *end, *colon;

    out[0] = '\0';
    while ((p = strstr(p, "OpenSSL Error[")) != NULL) {
        line = p;
        p++;
    }
    if (!line)
        return;
    end = strchr(line, '\n');
    if (!end)
        end = line + strlen(line);
    colon = NULL;
    for (p = line; p < end; p++) {
        if (*p == ':')
            colon = p;
    }
    if (!colon || colon + 1 >= end)
        return;
    snprintf(out, size, "%.*s", (int)(end - colon - 1), colon + 1);
}

void uplink_conn_explain_tls(struct uplink_conn *conn)
{
    char reason[160], ca[300];
    const char *hint = "";
    SSL *ssl = conn->mosq ? mosquitto_ssl_get(conn->mosq) : NULL;
    long verify = ssl ? SSL_get_verify_result(ssl) : X509_V_OK;

    if (conn->ca_system)
        snprintf(ca, sizeof(ca), "the system CA store (tls.ca: system)");
    else
        snprintf(ca, sizeof(ca), "tls.ca=%s", conn->ca_file);

    if (strstr(conn->captured, "host name verification failed")) {
        uplink_conn_fail(
            conn,
            "TLS handshake with %s:%d failed: host name verification failed (the server "
            "certificate is not issued for \"%s\"; check host, or the certificate's "
            "subjectAltName)",
            conn->host, conn->port, conn->host);
    } else if (strstr(conn->captured, "certificate verify failed") || verify != X509_V_OK) {
        switch (verify) {
        case X509_V_ERR_CERT_HAS_EXPIRED:
        case X509_V_ERR_CERT_NOT_YET_VALID:
            uplink_conn_fail(
                conn,
                "TLS handshake with %s:%d failed: certificate verify failed: %s (check the "
                "system clock and the server certificate's validity)",
                conn->host, conn->port, X509_verify_cert_error_string(verify));
            break;
        default:
            uplink_conn_fail(
                conn,
                "TLS handshake with %s:%d failed: certificate verify failed%s%s (the server "
                "certificate is not signed by a CA in %s; check tls.ca or the host name)",
                conn->host, conn->port, verify != X509_V_OK ? ": " : "",
                verify != X509_V_OK ? X509_verify_cert_error_string(verify) : "", ca);
            break;
        }
    } else if (strstr(conn->captured, "Unable to load CA certificates")) {
        uplink_conn_fail(conn, "cannot load CA certificates from %s (not PEM certificates?)", ca);
    } else if (strstr(conn->captured, "Unable to load client certificate")) {
        uplink_conn_fail(conn, "cannot load the client certificate tls.cert=%s (not a PEM chain?)",
                         conn->cert);
    } else if (strstr(conn->captured, "Unable to load client key")) {
        uplink_conn_fail(conn, "cannot load the private key tls.key=%s (not PEM, or encrypted?)",
                         conn->key);
    } else if (strstr(conn->captured, "certificate/key are inconsistent")) {
        uplink_conn_fail(conn, "tls.cert=%s and tls.key=%s do not belong together", conn->cert,
                         conn->key);
    } else {
        captured_openssl_reason(conn, reason, sizeof(reason));
        if (strstr(reason, "wrong version number") || strstr(reason, "packet length too long"))
            hint = " (the server does not speak TLS on this port; check port and tls.enabled)";
        else if (strstr(reason, "unexpected eof"))
            hint = " (the server hung up during the handshake: not a TLS port, or it requires SNI "
                   "or a client certificate)";
        else if (strstr(reason, "alert certificate required") ||
                 strstr(reason, "alert bad certificate") || strstr(reason, "alert unknown ca") ||
                 strstr(reason, "alert handshake failure"))
            hint = " (the server rejected or requires a client certificate; check tls.cert and "
                   "tls.key)";
        uplink_conn_fail(conn, "TLS handshake with %s:%d failed: %s%s", conn->host, conn->port,
                         reason[0] ? reason : "no details from OpenSSL", hint);
    }
}

const char *uplink_format_utc(time_t t, char *buf, size_t size)
{
    struct tm tm;

    if (!gmtime_r(&t, &tm) || !strftime(buf, size, "%Y-%m-%d %H:%M:%S UTC", &tm))
        snprintf(buf, size, "%lld", (long long)t);
    return buf;
}

/* CONNACK 4 or 5 to a JWT: GCP, ClearBlade and akenza say nothing more, so
 * one line carries what this cloud usually means by it (the profile's
 * connack_text_cb: which checks apply there) and the facts to check them
 * against: what the token carried and what the local clock says. */
static void conn_explain_jwt_refused(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    const char *text = uplink_ask_connack_text(uplink, conn->connack_rc);
    char iat[40], exp[40], clock[40];

    uplink_conn_fail(
        conn,
        "broker %s:%d: the server refused the JWT (CONNACK %d): %s (sent: alg %s%s%s, aud "
        "\"%s\", iat %s, exp %s; local clock %s)",
        conn->host, conn->port, conn->connack_rc,
        text ? text : "check alg matches the registered key, aud, exp <= 24 h, and the clock",
        jwt_alg_name(jwt_signer_alg(conn->signer)), jwt_signer_kid(conn->signer) ? ", kid " : "",
        jwt_signer_kid(conn->signer) ? jwt_signer_kid(conn->signer) : "",
        conn->jwt_aud ? conn->jwt_aud : "",
        uplink_format_utc(conn->token_signed_at - (time_t)conn->claims.skew_s, iat, sizeof(iat)),
        uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)),
        uplink_format_utc(time(NULL), clock, sizeof(clock)));
}

void uplink_conn_explain_closed(struct uplink_conn *conn, int err)
{
    char why[128] = "";
    char exp[40];

    if (err && err != EPROTO)
        snprintf(why, sizeof(why), " (%s)", strerror(err));
    if (conn_online(conn) && conn->token_expires_at && time(NULL) >= conn->token_expires_at)
        uplink_conn_fail(
            conn,
            "connection to %s:%d lost: closed by the server%s after the JWT expired at %s "
            "(JWT clouds drop a session at exp; the token was not rotated in time)",
            conn->host, conn->port, why,
            uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)));
    else if (conn_online(conn))
        uplink_conn_fail(conn, "connection to %s:%d lost: closed by the server%s", conn->host,
                         conn->port, why);
    else if (err == ECONNREFUSED || err == ENETUNREACH || err == EHOSTUNREACH || err == ETIMEDOUT)
        /* The TCP connect itself failed: on loopback, mosquitto_connect_async()
         * already returns ECONNREFUSED; nothing was closed, nothing listened. */
        uplink_conn_fail(conn, "connection to %s:%d failed: %s%s", conn->host, conn->port,
                         strerror(err), uplink_errno_hint(err));
    else
        uplink_conn_fail(
            conn,
            "%s:%d closed the connection before CONNACK%s (wrong port, a TLS port without "
            "tls.enabled, or the broker rejected client_id, credentials or the client "
            "certificate: check tls.cert/tls.key)",
            conn->host, conn->port, why);
}

void uplink_conn_explain_rc(struct uplink_conn *conn, int rc, int err)
{
    if (conn->failed)
        return;
    if (rc == MOSQ_ERR_SUCCESS && conn->disconnect_rc > 0)
        rc = conn->disconnect_rc;

    if (conn_connacked(conn) && (conn->connack_rc == 4 || conn->connack_rc == 5) &&
        conn->token_expires_at && conn->signer) {
        conn_explain_jwt_refused(conn);
    } else if (conn_connacked(conn) && (conn->connack_rc == 4 || conn->connack_rc == 5) &&
               conn->token_expires_at) {
        /* A token the profile made (Azure SAS): its words, and the clocks. */
        const char *text = uplink_ask_connack_text(conn->uplink, conn->connack_rc);
        char exp[40], clock[40];
        uplink_conn_fail(conn,
                         "broker %s:%d refused the token (CONNACK %d): %s (it expires at %s; "
                         "local clock %s)",
                         conn->host, conn->port, conn->connack_rc,
                         text ? text : connack_text(conn->connack_rc),
                         uplink_format_utc(conn->token_expires_at, exp, sizeof(exp)),
                         uplink_format_utc(time(NULL), clock, sizeof(clock)));
    } else if (conn_connacked(conn) && conn->connack_rc != 0) {
        /* The profile may know what this cloud means by the code. */
        const char *text = uplink_ask_connack_text(conn->uplink, conn->connack_rc);
        uplink_conn_fail(conn, "broker %s:%d refused the connection: CONNACK %d %s", conn->host,
                         conn->port, conn->connack_rc,
                         text ? text : connack_text(conn->connack_rc));
    } else if (rc == MOSQ_ERR_TLS ||
               (strstr(conn->captured, "OpenSSL Error") && !conn_online(conn))) {
        uplink_conn_explain_tls(conn);
    } else if (rc == MOSQ_ERR_KEEPALIVE) {
        if (conn_online(conn))
            uplink_conn_fail(conn,
                             "connection to %s:%d lost: no answer to PINGREQ within keepalive %d s",
                             conn->host, conn->port, conn->keepalive);
        else
            uplink_conn_fail(conn, "no CONNACK from %s:%d within keepalive %d s", conn->host,
                             conn->port, conn->keepalive);
    } else if (rc == MOSQ_ERR_CONN_LOST || rc == MOSQ_ERR_SUCCESS || rc == MOSQ_ERR_NO_CONN) {
        uplink_conn_explain_closed(conn, 0);
    } else if (rc == MOSQ_ERR_ERRNO) {
        if (err == EPROTO && strstr(conn->captured, "OpenSSL Error"))
            uplink_conn_explain_tls(conn);
        else
            uplink_conn_explain_closed(conn, err);
    } else if (rc == MOSQ_ERR_PROTOCOL || rc == MOSQ_ERR_MALFORMED_PACKET) {
        uplink_conn_fail(conn, "protocol error from %s:%d (%s); is this an MQTT 3.1.1 broker?",
                         conn->host, conn->port, mosquitto_strerror(rc));
    } else {
        uplink_conn_fail(conn, "connection to %s:%d failed: %s", conn->host, conn->port,
                         mosquitto_strerror(rc));
    }
}

void uplink_conn_check(struct uplink_conn *conn, int rc, int err)
{
    if (rc == MOSQ_ERR_SUCCESS && mosquitto_socket(conn->mosq) != -1)
        return;
    uplink_conn_explain_rc(conn, rc, err);
}
