/* uplink_conn.c - one connection attempt's set-up (uplink_int.h): copies
 * of what the worker needs, then on the threadpool the mosquitto object,
 * its options, TLS files, the signed JWT and connect_async. libmosquitto's
 * callbacks are the state machine's, handed down in struct
 * uplink_mosq_cbs.
 */
#include "uplink_int.h"

static bool conn_on_loop_thread(const struct uplink_conn *conn)
{
    return pthread_equal(pthread_self(), conn->uplink->loop_thread);
}

static void conn_log_cb(struct mosquitto *mosq, void *obj, int level, const char *text)
{
    struct uplink_conn *conn = obj;
    size_t len;

    if (level & (MOSQ_LOG_ERR | MOSQ_LOG_WARNING)) {
        /* Keep the text for the one-line explanation (OpenSSL errors arrive
         * here as "OpenSSL Error[0]: error:...:certificate verify failed"). */
        len = strlen(text);
        if (conn->captured_len + len + 2 < sizeof(conn->captured)) {
            if (conn->captured_len)
                conn->captured[conn->captured_len++] = '\n';
            memcpy(conn->captured + conn->captured_len, text, len + 1);
            conn->captured_len += len;
        }
    }
    /* log.c is not promised to be thread-safe: from the worker we only keep
     * the text; the failure it explains is logged from the loop thread. */
    if (conn_on_loop_thread(conn))
        log_uplink(LOG_DEBUG, conn->uplink->name, "libmosquitto: %s", text);
}

/* --- the threadpool part of a connection attempt ------------------------- */

void uplink_conn_free(struct uplink_conn *conn)
{
    if (!conn)
        return;
    free(conn->host);
    free(conn->client_id);
    free(conn->ca_file);
    free(conn->cert);
    free(conn->key);
    free(conn->key_pin_file);
    free(conn->key_module);
    free(conn->username);
    if (conn->password) {
        explicit_bzero(conn->password, strlen(conn->password));
        free(conn->password);
    }
    free(conn->alpn);
    free(conn->will_topic);
    free(conn->will_payload);
    jwt_signer_free(conn->signer);
    free(conn->jwt_aud);
    for (size_t i = 0; conn->jwt_extra && i < conn->claims.extra_count; i++) {
        free((char *)conn->jwt_extra[i].name);
        free((char *)conn->jwt_extra[i].value);
    }
    free(conn->jwt_extra);
    free(conn);
}

int uplink_conn_copy_jwt(struct uplink_conn *conn, const struct conf_jwt *jwt)
{
    /* A key that uplink_reload_credentials() found newer than the conf's. */
    EVP_PKEY *key = conn->uplink->jwt_key ? conn->uplink->jwt_key : jwt->private_key;
    char err[KEYS_ERR_SIZE];
    int rc;

    uplink_creds_fp_jwt_key(key, jwt->key, conn->creds.jwt);
    rc = jwt_signer_new(key, jwt->alg, jwt->kid_mode, jwt->kid, &conn->signer, err, sizeof(err));
    if (rc < 0) {
        /* conf_load() built the same signer, so only memory can fail here. */
        log_uplink(LOG_ERR, conn->uplink->name, "cannot prepare the JWT signer: %s", err);
        return rc;
    }
    if (jwt->aud && !(conn->jwt_aud = strdup(jwt->aud)))
        return -ENOMEM;
    if (jwt->claim_count) {
        conn->jwt_extra = calloc(jwt->claim_count, sizeof(*conn->jwt_extra));
        if (!conn->jwt_extra)
            return -ENOMEM;
    }
    for (size_t i = 0; i < jwt->claim_count; i++) {
        conn->jwt_extra[i].name = strdup(jwt->claims[i].name);
        conn->jwt_extra[i].value = strdup(jwt->claims[i].value);
        conn->claims.extra_count++;
        if (!conn->jwt_extra[i].name || !conn->jwt_extra[i].value)
            return -ENOMEM;
    }
    conn->claims.aud = conn->jwt_aud;
    conn->claims.extra = conn->jwt_extra;
    conn->claims.lifetime_s = jwt->lifetime_s;
    conn->claims.max_lifetime_s = jwt->max_lifetime_s;
    conn->claims.skew_s = jwt->skew_s;
    conn->refresh_percent = jwt->refresh_percent;
    return 0;
}

/* Loop thread: let the profile set client id, credentials, will and clean
 * session for this attempt (its profile instance, or uplink_hooks.session_cb). */
static int conn_apply_session(struct uplink_conn *conn)
{
    struct uplink *uplink = conn->uplink;
    struct uplink_session session;

    memset(&session, 0, sizeof(session));
    uplink_ask_session(uplink, &session);
    if (session.client_id) {
        free(conn->client_id);
        if (!(conn->client_id = strdup(session.client_id)))
            return -ENOMEM;
    }
    if (session.clean_session)
        conn->clean_session = true;
    if (session.username) {
        free(conn->username);
        if (conn->password) {
            explicit_bzero(conn->password, strlen(conn->password));
            free(conn->password);
            conn->password = NULL;
        }
        if (!(conn->username = strdup(session.username)))
            return -ENOMEM;
        if (session.password && !(conn->password = strdup(session.password)))
            return -ENOMEM;
        if (session.password && session.password_expires_at) {
            /* Rotated like a JWT (uplink_arm_rotation), signed now. */
            conn->token_signed_at = time(NULL);
            conn->token_signed_mono_ms = util_now_ms();
            conn->token_expires_at = session.password_expires_at;
            conn->refresh_percent =
                session.password_refresh_percent ? session.password_refresh_percent : 80;
        }
    }
    if (session.will_topic) {
        if (!(conn->will_topic = strdup(session.will_topic)))
            return -ENOMEM;
        if (session.will_len) {
            if (!(conn->will_payload = malloc(session.will_len)))
                return -ENOMEM;
            memcpy(conn->will_payload, session.will_payload, session.will_len);
        }
        conn->will_len = session.will_len;
        conn->will_qos = session.will_qos;
        conn->will_retain = session.will_retain;
    }
    if (session.cert && session.key && conn->tls) {
        free(conn->cert);
        free(conn->key);
        conn->cert = strdup(session.cert);
        conn->key = strdup(session.key);
        if (!conn->cert || !conn->key)
            return -ENOMEM;
    }
    conn->hold_spool = session.hold_spool;
    return 0;
}

/* The attempt's phases (the diagram is above enum conn_phase, uplink_int.h). */
static const struct sm_state conn_phases[] = {
    [CONN_SETUP] = {"SETUP", SM_TO(CONN_TCP)},
    [CONN_TCP] = {"TCP", SM_TO(CONN_TLS) | SM_TO(CONN_MQTT)},
    [CONN_TLS] = {"TLS", SM_TO(CONN_MQTT)},
    [CONN_MQTT] = {"MQTT", SM_TO(CONN_CONNACKED)},
    [CONN_CONNACKED] = {"CONNACKED", SM_TO(CONN_ONLINE)},
    [CONN_ONLINE] = {"ONLINE", 0},
};

static void conn_sm_describe(const struct sm *sm, char *buf, size_t size)
{
    const struct uplink_conn *conn = container_of(sm, struct uplink_conn, sm);

    snprintf(buf, size, "connection to %s:%d", conn->host, conn->port);
}

static const char *conn_sm_log_name(const struct sm *sm)
{
    return container_of(sm, struct uplink_conn, sm)->uplink->name;
}

/* The worker owns the libmosquitto object only while setting up. */
static bool conn_sm_invariant(const struct sm *sm, char *why, size_t size)
{
    const struct uplink_conn *conn = container_of(sm, struct uplink_conn, sm);

    if (conn->work_pending && sm_state(sm) != CONN_SETUP) {
        snprintf(why, size, "the threadpool still holds the connection");
        return false;
    }
    return true;
}

static const struct sm_conf conn_sm = {
    .states = conn_phases,
    .count = ARRAY_SIZE(conn_phases),
    .level = LOG_DEBUG,
    .describe = conn_sm_describe,
    .log_name = conn_sm_log_name,
    .invariant = conn_sm_invariant,
};

struct uplink_conn *uplink_conn_new(struct uplink *uplink, const struct uplink_mosq_cbs *cbs)
{
    const struct conf_uplink *conf = uplink->conf;
    struct uplink_conn *conn;

    conn = calloc(1, sizeof(*conn));
    if (!conn)
        return NULL;
    conn->uplink = uplink;
    conn->cbs = cbs;
    sm_init(&conn->sm, &conn_sm, CONN_SETUP);
    conn->port = conf->port;
    conn->keepalive = (int)conf->keepalive_s;
    conn->window = conf->max_inflight ? conf->max_inflight : 100;
    if (uplink->inflight_cap != conn->window) {
        /* No connection, so nothing is in flight: the ring starts afresh. */
        struct uplink_inflight *tab = calloc(conn->window, sizeof(*tab));
        if (!tab) {
            free(conn);
            return NULL;
        }
        free(uplink->inflight_tab);
        uplink->inflight_tab = tab;
        uplink->inflight_cap = conn->window;
        uplink->inflight_head = 0;
    }
    conn->clean_session = conf->clean_session;
    conn->tls = conf->tls.enabled;
    conn->ca_system = conf->tls.ca_system || !conf->tls.ca_file;
    conn->disconnect_rc = -1;
    conn->host = strdup(conf->host);
    conn->client_id = strdup(conf->client_id ? conf->client_id : uplink->gateway_id);
    if (!conn->host || !conn->client_id)
        goto err;
    if (conn->tls) {
        if (conf->tls.ca_file && !(conn->ca_file = strdup(conf->tls.ca_file)))
            goto err;
        if (conf->tls.cert && !(conn->cert = strdup(conf->tls.cert)))
            goto err;
        if (conf->tls.key && !(conn->key = strdup(conf->tls.key)))
            goto err;
        struct keys_options key_options;
        tlscheck_key_options(conf, &key_options);
        if (key_options.passphrase_file &&
            !(conn->key_pin_file = strdup(key_options.passphrase_file)))
            goto err;
        if (key_options.pkcs11_module && !(conn->key_module = strdup(key_options.pkcs11_module)))
            goto err;
        if (conf->tls.alpn && !(conn->alpn = strdup(conf->tls.alpn)))
            goto err;
        conn->tls_version = conf->tls.min_version;
        conn->insecure = conf->tls.insecure;
    }
    if (conf->auth.type == CONF_AUTH_BASIC) {
        if (!(conn->username = strdup(conf->auth.username ? conf->auth.username : "")))
            goto err;
        if (conf->auth.password && !(conn->password = strdup(conf->auth.password)))
            goto err;
    }
    if (conf->auth.type == CONF_AUTH_JWT) {
        if (!(conn->username = strdup(conf->auth.username ? conf->auth.username : "unused")))
            goto err;
        if (uplink_conn_copy_jwt(conn, &conf->auth.jwt) < 0)
            goto err;
    }
    if (uplink_asks_session(uplink) && conn_apply_session(conn) < 0)
        goto err;
    return conn;

err:
    uplink_conn_free(conn);
    return NULL;
}

/* Threadpool: sign this attempt's token (a slow PKCS#11 token never stalls
 * the loop). The clock was checked on the loop thread just before. */
static int conn_sign(struct uplink_conn *conn)
{
    char err[KEYS_ERR_SIZE];
    time_t now = time(NULL);
    time_t expires_at = 0;
    int rc;

    rc = uplink_creds_sign(conn->signer, &conn->claims, now, &conn->password, &expires_at, err,
                           sizeof(err));
    if (rc < 0) {
        uplink_conn_fail(conn, "cannot sign a JWT with auth.key: %s", err);
        return rc;
    }
    conn->token_signed_at = now;
    conn->token_signed_mono_ms = util_now_ms();
    conn->token_expires_at = expires_at;
    return 0;
}

/* Threadpool: tls.key is a pkcs11: URI. libmosquitto 2.0.11 cannot take it
 * as a key file: mosquitto_tls_set() fopen()s every file it is given, and
 * its MOSQ_OPT_TLS_ENGINE path makes the engine OpenSSL's default for every
 * algorithm (ENGINE_set_default(ENGINE_METHOD_ALL)) and leaks the key on
 * each connect (lib/options.c, lib/net_mosq.c net__init_ssl_ctx). So the
 * whole SSL_CTX is ours, handed over with MOSQ_OPT_SSL_CTX: the certificate
 * chain and token key (keys_use_client_cert, the code of the start-up
 * check), tls.ca, peer and host name verification, TLS version and ALPN as
 * libmosquitto sets them for a PEM key. Not MOSQ_OPT_SSL_CTX_WITH_DEFAULTS:
 * with a context given, 2.0.11 skips net__init_tls(), so its verify callback
 * finds no mosq in the SSL (ex_data index -1) and refuses every server
 * certificate until some other connection in the process initialised it.
 * libmosquitto still sets SNI to conn->host (net__socket_connect_step3).
 * The handshake signature is made in the token, on the loop thread. */
static int conn_use_token_key(struct uplink_conn *conn)
{
    struct keys_options options = {.passphrase_file = conn->key_pin_file,
                                   .pkcs11_module = conn->key_module};
    char err[KEYS_ERR_SIZE];
    SSL_CTX *ctx = SSL_CTX_new(TLS_client_method());
    int rc = -EINVAL;

    if (!ctx) {
        uplink_conn_fail(conn, "cannot create a TLS context (out of memory?)");
        return -ENOMEM;
    }
    SSL_CTX_set_min_proto_version(ctx, conn->tls_version == CONF_TLS_1_3 ? TLS1_3_VERSION
                                                                         : TLS1_2_VERSION);
    SSL_CTX_set_options(ctx, SSL_OP_NO_COMPRESSION);
    SSL_CTX_set_mode(ctx, SSL_MODE_RELEASE_BUFFERS);
    if (conn->ca_system ? SSL_CTX_set_default_verify_paths(ctx) != 1
                        : SSL_CTX_load_verify_file(ctx, conn->ca_file) != 1) {
        uplink_conn_fail(conn, "cannot load CA certificates from %s (not PEM certificates?)",
                         conn->ca_system ? "the system CA store" : conn->ca_file);
        goto out;
    }
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (!conn->insecure) {
        /* RFC 6125 §6.4: the host must match the certificate; an IP address
         * is matched against iPAddress entries instead. */
        X509_VERIFY_PARAM *param = SSL_CTX_get0_param(ctx);
        X509_VERIFY_PARAM_set_hostflags(param, X509_CHECK_FLAG_NO_PARTIAL_WILDCARDS);
        if (X509_VERIFY_PARAM_set1_ip_asc(param, conn->host) != 1 &&
            X509_VERIFY_PARAM_set1_host(param, conn->host, 0) != 1) {
            uplink_conn_fail(conn, "cannot set the host name \"%s\" to verify", conn->host);
            goto out;
        }
    }
    if (conn->alpn) {
        unsigned char wire[256];
        size_t len = strnlen(conn->alpn, 255);
        wire[0] = (unsigned char)len; /* RFC 7301 §3.1: length-prefixed names */
        memcpy(wire + 1, conn->alpn, len);
        SSL_CTX_set_alpn_protos(ctx, wire, (unsigned)len + 1);
    }
    rc = keys_use_client_cert(ctx, conn->cert, conn->key, &options, err, sizeof(err));
    if (rc < 0) {
        uplink_conn_fail(conn, "cannot use tls.cert/tls.key: %s", err);
        goto out;
    }
    /* libmosquitto takes its own reference (SSL_CTX_up_ref) and frees it in
     * mosquitto_destroy(). */
    if (mosquitto_int_option(conn->mosq, MOSQ_OPT_SSL_CTX_WITH_DEFAULTS, 0) != MOSQ_ERR_SUCCESS ||
        mosquitto_void_option(conn->mosq, MOSQ_OPT_SSL_CTX, ctx) != MOSQ_ERR_SUCCESS) {
        uplink_conn_fail(conn, "libmosquitto refused the TLS context for tls.key");
        rc = -EINVAL;
    }
out:
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return rc;
}

/* libmosquitto 2.0.11 sets up its TLS globals (a UI_METHOD, the SSL ex_data
 * index its certificate verify callback finds the client by) on the first
 * TLS connect, in net__init_tls(), behind an unlocked flag
 * (lib/net_mosq.c). Two first connects on two threadpool threads (an
 * uplink and its per-device sessions start together) both run it: one
 * UI_METHOD leaks (LeakSanitizer: 88 + 35 bytes from UI_create_method) and
 * an SSL tagged with the first index is looked up with the second, which
 * fails its certificate check. So TLS connects take turns until one has
 * created its SSL object through that path; after that the globals are
 * only read. Both are used only in conn_setup(). */
static pthread_mutex_t mosq_tls_init_lock = PTHREAD_MUTEX_INITIALIZER;
static bool mosq_tls_initialised; /* guarded by mosq_tls_init_lock */

/* Runs on the threadpool: everything that may block (file access for the TLS
 * files, DNS, the connect() call). Touches only @conn. */
static int conn_setup(struct uplink_conn *conn)
{
    struct mosquitto *mosq;
    const char *ca_file = NULL, *ca_path = NULL;
    bool tls_init_turn = false;
    int rc;

    mosq = mosquitto_new(conn->client_id, conn->clean_session, conn);
    if (!mosq) {
        uplink_conn_fail(conn, "cannot create the MQTT client: %s", strerror(errno));
        return -ENOMEM;
    }
    conn->mosq = mosq;
    mosquitto_log_callback_set(mosq, conn_log_cb);
    mosquitto_connect_callback_set(mosq, conn->cbs->connect);
    mosquitto_disconnect_callback_set(mosq, conn->cbs->disconnect);
    mosquitto_publish_callback_set(mosq, conn->cbs->publish);
    mosquitto_message_callback_set(mosq, conn->cbs->message);
    mosquitto_subscribe_callback_set(mosq, conn->cbs->subscribe);
    /* Our window and libmosquitto's send quota are the same number. */
    mosquitto_int_option(mosq, MOSQ_OPT_SEND_MAXIMUM, (int)conn->window);
    /* MQTT packets are small and latency matters more than segment count. */
    mosquitto_int_option(mosq, MOSQ_OPT_TCP_NODELAY, 1);

    if (conn->signer && conn_sign(conn) < 0)
        return -EINVAL;
    if (conn->username) {
        rc = mosquitto_username_pw_set(mosq, conn->username, conn->password);
        if (rc) {
            uplink_conn_fail(conn, "libmosquitto refused auth.username: %s",
                             mosquitto_strerror(rc));
            return -EINVAL;
        }
    }
    /* MQTT 3.1.1 §3.1.2.5: the broker publishes the will when the
     * connection is lost without a DISCONNECT. */
    if (conn->will_topic) {
        rc = mosquitto_will_set(mosq, conn->will_topic, (int)conn->will_len, conn->will_payload,
                                conn->will_qos, conn->will_retain);
        if (rc) {
            uplink_conn_fail(conn, "libmosquitto refused the last will on \"%s\": %s",
                             conn->will_topic, mosquitto_strerror(rc));
            return -EINVAL;
        }
    }

    if (conn->tls) {
        bool token_key = conn->cert && keys_is_uri(conn->key);
        /* mosquitto_tls_set() only says MOSQ_ERR_INVAL for an unreadable file;
         * check first so the user learns which file and why. */
        if (conn->ca_file && !conn->ca_system && access(conn->ca_file, R_OK) != 0) {
            uplink_conn_fail(conn, "cannot read tls.ca=%s: %s", conn->ca_file, strerror(errno));
            return -EINVAL;
        }
        if (conn->cert && access(conn->cert, R_OK) != 0) {
            uplink_conn_fail(conn, "cannot read tls.cert=%s: %s", conn->cert, strerror(errno));
            return -EINVAL;
        }
        if (conn->key && !token_key && access(conn->key, R_OK) != 0) {
            uplink_conn_fail(conn, "cannot read tls.key=%s: %s", conn->key, strerror(errno));
            return -EINVAL;
        }
        if (token_key) {
            if (conn_use_token_key(conn) < 0)
                return -EINVAL;
        } else if (conn->ca_system) {
            /* 2.0.11 has MOSQ_OPT_TLS_USE_OS_CERTS (SSL_CTX_set_default_verify_paths,
             * which also honours SSL_CERT_FILE/SSL_CERT_DIR). A client
             * certificate can only be given through mosquitto_tls_set(), which
             * insists on a CA file or directory: pass OpenSSL's own directory. */
            mosquitto_int_option(mosq, MOSQ_OPT_TLS_USE_OS_CERTS, 1);
            ca_path = X509_get_default_cert_dir();
        } else {
            ca_file = conn->ca_file;
        }
        if (!token_key && (ca_file || conn->cert)) {
            rc = mosquitto_tls_set(mosq, ca_file, ca_path, conn->cert, conn->key, NULL);
            if (rc) {
                uplink_conn_fail(
                    conn, "libmosquitto refused the TLS files (tls.ca, tls.cert, tls.key): %s",
                    mosquitto_strerror(rc));
                return -EINVAL;
            }
        }
        /* Verify the peer, TLS 1.2 at least (1.3 stays allowed) unless
         * tls.min_version says 1.3. tls.insecure turns off only the host
         * name check (the chain is still verified against tls.ca). SNI is
         * sent either way. */
        rc = mosquitto_tls_opts_set(
            mosq, SSL_VERIFY_PEER, conn->tls_version == CONF_TLS_1_3 ? "tlsv1.3" : "tlsv1.2", NULL);
        if (!rc)
            rc = mosquitto_tls_insecure_set(mosq, conn->insecure);
        /* RFC 7301; AWS IoT on port 443 wants "x-amzn-mqtt-ca". */
        if (!rc && conn->alpn)
            rc = mosquitto_string_option(mosq, MOSQ_OPT_TLS_ALPN, conn->alpn);
        if (rc) {
            uplink_conn_fail(conn, "libmosquitto refused the TLS options: %s",
                             mosquitto_strerror(rc));
            return -EINVAL;
        }
    }

    /* Resolves conf->host, connects non-blocking, creates the SSL object with
     * SNI set to this same host (lib/net_mosq.c net__socket_connect_step3)
     * and queues CONNECT. */
    if (conn->tls) {
        pthread_mutex_lock(&mosq_tls_init_lock);
        tls_init_turn = !mosq_tls_initialised;
        if (!tls_init_turn)
            pthread_mutex_unlock(&mosq_tls_init_lock);
    }
    errno = 0;
    conn->connect_rc = mosquitto_connect_async(mosq, conn->host, conn->port, conn->keepalive);
    conn->connect_errno = errno;
    if (tls_init_turn) {
        /* A context of our own (tls.key on a token) skips net__init_tls(). */
        if (mosquitto_ssl_get(mosq) != NULL && !(conn->cert && keys_is_uri(conn->key)))
            mosq_tls_initialised = true;
        pthread_mutex_unlock(&mosq_tls_init_lock);
    }
    return conn->connect_rc == MOSQ_ERR_SUCCESS ? 0 : -EIO;
}

void uplink_conn_work_cb(uv_work_t *req)
{
    struct uplink_conn *conn = container_of(req, struct uplink_conn, work);

    uplink_conn_take_creds(conn);
    if (conn->tls && conn->cert)
        conn->cert_not_after = tlscheck_cert_not_after(conn->cert);
    conn_setup(conn);
    /* OpenSSL keeps per-thread state (error queue, DRBG) for this threadpool
     * thread; libuv's threads never exit before the process does, so release
     * it now instead of leaving one block per worker behind (valgrind's
     * "definitely lost"). OpenSSL re-creates it if the thread signs again. */
    OPENSSL_thread_stop();
}
