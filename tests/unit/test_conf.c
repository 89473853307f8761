/* test_conf.c - conf_load() on good and bad files, conf_uplink_equal(), and
 * the util parsers it relies on.
 *
 * Fixtures live in $UPLINKD_TEST_DATA/conf (tests/unit/data/conf). Every bad
 * fixture is listed in bad_cases[] with the exact "FILE:LINE:COLUMN: KEY:"
 * it must produce, so a change that moves a mark or renames a key path shows
 * up here.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <syslog.h>
#include <unistd.h>

#include <cmocka.h>

#include "access.h"
#include "conf.h"
#include "profiles/akenza/section.h"
#include "profiles/cumulocity/section.h"
#include "profiles/gcp/section.h"
#include "profiles/generic/section.h"
#include "util.h"

static const char *data_dir(void)
{
    const char *dir = getenv("UPLINKD_TEST_DATA");

    if (dir == NULL)
        fail_msg("UPLINKD_TEST_DATA is not set (run through meson test)");
    return dir;
}

static void fixture_path(char *buf, size_t size, const char *name)
{
    int n = snprintf(buf, size, "%s/conf/%s", data_dir(), name);
    assert_true(n > 0 && (size_t)n < size);
}

static struct conf *load_ok(const char *name)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    char *errors = NULL;
    int rc;

    fixture_path(path, sizeof(path), name);
    rc = conf_load(path, &conf, &errors);
    if (rc != 0)
        fail_msg("conf_load(%s) = %d:\n%s", path, rc, errors ? errors : "(no message)");
    assert_null(errors);
    assert_non_null(conf);
    return conf;
}

/* ------------------------------------------------------------------------ */

static void test_full(void **state)
{
    char path[PATH_MAX];
    struct conf *conf = load_ok("good-full.yaml");
    const struct conf_uplink *up;
    const struct conf_local *local = &conf->local;

    fixture_path(path, sizeof(path), "good-full.yaml");
    assert_string_equal(conf->path, path);
    assert_string_equal(conf->gateway_id, "gw-full.01");
    assert_string_equal(conf->state_dir, "/var/lib/uplinkd-test");

    assert_int_equal(local->listen_count, 4);
    assert_int_equal(local->listen[0].kind, CONF_LISTEN_TCP);
    assert_string_equal(local->listen[0].url, "tcp://127.0.0.1:11883");
    assert_string_equal(local->listen[0].host, "127.0.0.1");
    assert_int_equal(local->listen[0].port, 11883);
    assert_null(local->listen[0].path);
    assert_int_equal(local->listen[1].kind, CONF_LISTEN_TCP);
    assert_string_equal(local->listen[1].host, "::1"); /* brackets removed */
    assert_int_equal(local->listen[1].port, 11884);
    assert_string_equal(local->listen[2].host, "127.0.0.1"); /* localhost */
    assert_string_equal(local->listen[2].url, "tcp://localhost:11885");
    assert_int_equal(local->listen[3].kind, CONF_LISTEN_UNIX);
    assert_string_equal(local->listen[3].path, "/run/uplinkd-test/local.sock");
    assert_null(local->listen[3].host);
    assert_int_equal(local->socket_mode, 0640);
    assert_string_equal(local->socket_group, "uplinkd");
    assert_int_equal(local->max_packet_size, 64 * 1024);
    assert_int_equal(local->max_clients, 32);
    assert_int_equal(local->max_pending_connects, 16);
    assert_int_equal(local->max_pending_per_uid, 4);
    assert_int_equal(local->connect_deadline_ms, 2500);
    assert_int_equal(local->max_inflight, 20);
    assert_int_equal(local->max_queued, 500);
    assert_int_equal(local->max_queued_bytes, 8 * 1024 * 1024);
    assert_string_equal(local->topic_prefix, "devices");

    assert_string_equal(conf->control_socket, "/run/uplinkd-test/control.sock");
    assert_int_equal(conf->log_level, LOG_DEBUG);
    assert_int_equal(conf->shutdown_timeout_ms, 1500);

    assert_int_equal(conf->uplink_count, 2);
    up = &conf->uplinks[0];
    assert_string_equal(up->name, "hivemq");
    assert_string_equal(up->profile, "generic");
    assert_string_equal(up->host, "broker.example.com");
    assert_int_equal(up->port, 8884);
    assert_string_equal(up->client_id, "gw-full-client");
    assert_int_equal(up->keepalive_s, 120);
    assert_false(up->clean_session);
    assert_true(up->tls.enabled);
    assert_false(up->tls.ca_system);
    /* relative paths resolve against the file's directory */
    assert_non_null(up->tls.ca_file);
    assert_non_null(strstr(up->tls.ca_file, "/conf/ca.pem"));
    assert_true(up->tls.ca_file[0] == '/');
    assert_non_null(strstr(up->tls.cert, "/conf/client.pem"));
    assert_non_null(strstr(up->tls.key, "/conf/client.key"));
    assert_int_equal(up->auth.type, CONF_AUTH_BASIC);
    assert_string_equal(up->auth.username, "device-user");
    assert_string_equal(up->auth.password, "s3cret pass"); /* trailing newline dropped */
    assert_int_equal(up->reconnect_base_ms, 500);
    assert_int_equal(up->reconnect_cap_ms, 60000);
    assert_int_equal(up->max_queued_messages, 500);
    assert_int_equal(up->max_inflight, 1000);
    assert_string_equal(generic_conf(up)->topic_prefix, "site/a");

    up = &conf->uplinks[1];
    assert_string_equal(up->name, "plain_local-2");
    assert_string_equal(up->profile, "generic");
    assert_string_equal(up->host, "::1");
    assert_false(up->tls.enabled);
    assert_int_equal(up->port, 1883); /* default without TLS */
    assert_string_equal(up->client_id, "gw-full.01");
    assert_string_equal(generic_conf(up)->topic_prefix, "gw-full.01");
    assert_int_equal(up->auth.type, CONF_AUTH_BASIC);
    assert_string_equal(up->auth.username, "u2");
    assert_string_equal(up->auth.password, "p: 2");
    assert_int_equal(up->keepalive_s, 60);
    assert_true(up->clean_session);

    assert_int_equal(conf->route_count, 2);
    assert_string_equal(conf->routes[0].children, "modbus-*");
    assert_int_equal(conf->routes[0].uplink_count, 1);
    assert_int_equal(conf->routes[0].uplinks[0], 0);
    assert_string_equal(conf->routes[1].children, "*");
    assert_int_equal(conf->routes[1].uplink_count, 2);
    assert_int_equal(conf->routes[1].uplinks[0], 0);
    assert_int_equal(conf->routes[1].uplinks[1], 1);

    conf_free(conf);
}

static void test_minimal_defaults(void **state)
{
    struct conf *conf = load_ok("good-minimal.yaml");

    assert_string_equal(conf->gateway_id, "gw-0001");
    assert_string_equal(conf->state_dir, "/var/lib/uplinkd");
    assert_int_equal(conf->local.listen_count, 2);
    assert_int_equal(conf->local.listen[0].kind, CONF_LISTEN_TCP);
    assert_string_equal(conf->local.listen[0].url, "tcp://127.0.0.1:1883");
    assert_string_equal(conf->local.listen[0].host, "127.0.0.1");
    assert_int_equal(conf->local.listen[0].port, 1883);
    assert_int_equal(conf->local.listen[1].kind, CONF_LISTEN_UNIX);
    assert_string_equal(conf->local.listen[1].url, "unix:///run/uplinkd/local.sock");
    assert_string_equal(conf->local.listen[1].path, "/run/uplinkd/local.sock");
    assert_int_equal(conf->local.socket_mode, 0660);
    assert_null(conf->local.socket_group);
    assert_int_equal(conf->local.max_packet_size, 256 * 1024);
    assert_int_equal(conf->local.max_clients, 1024);
    assert_int_equal(conf->local.max_pending_connects, 128);
    assert_int_equal(conf->local.max_pending_per_uid, 32);
    assert_int_equal(conf->local.connect_deadline_ms, 5000);
    assert_int_equal(conf->local.max_inflight, 100);
    assert_int_equal(conf->local.max_queued, 1000);
    assert_int_equal(conf->local.max_queued_bytes, 64 * 1024 * 1024);
    assert_string_equal(conf->local.topic_prefix, "dev");
    assert_string_equal(conf->control_socket, "/run/uplinkd/control.sock");
    assert_int_equal(conf->log_level, LOG_INFO);
    assert_int_equal(conf->shutdown_timeout_ms, 5000);
    assert_int_equal(conf->uplink_count, 0);
    assert_null(conf->uplinks);
    assert_int_equal(conf->route_count, 0);
    assert_null(conf->routes);
    assert_null(conf_uplink_find(conf, "cloud"));
    conf_free(conf);
}

/* The per-uid default never exceeds a smaller per-listener budget. */
static void test_pending_defaults_capped(void **state)
{
    struct conf *conf = load_ok("good-pending.yaml");

    assert_int_equal(conf->local.max_pending_connects, 8);
    assert_int_equal(conf->local.max_pending_per_uid, 8);
    assert_int_equal(conf->local.connect_deadline_ms, 5000);
    conf_free(conf);
}

/* uplinks[].spool and rate: defaults and every key. */
static void test_spool_keys(void **state)
{
    struct conf *conf = load_ok("good-spool.yaml");
    const struct conf_uplink *a = conf_uplink_find(conf, "a");
    const struct conf_uplink *b = conf_uplink_find(conf, "b");

    assert_int_equal(a->spool.durability, CONF_SPOOL_FSYNC);
    assert_int_equal(a->spool.max_bytes, 256ULL * 1024 * 1024);
    assert_int_equal(a->spool.max_age_ms, 0);
    assert_int_equal(a->spool.overflow, CONF_SPOOL_BLOCK);
    assert_int_equal(a->spool.commit_interval_ms, 5);
    assert_int_equal(a->spool.commit_gap_ms, 0);
    assert_false(a->spool.qos0_offline_spool);
    assert_int_equal(a->rate.max_msgs_per_s, 0);
    assert_int_equal(a->rate.max_bytes_per_s, 0);
    assert_int_equal(b->spool.durability, CONF_SPOOL_NONE);
    assert_int_equal(b->spool.max_bytes, 1024 * 1024);
    assert_int_equal(b->spool.max_age_ms, 2 * 3600 * 1000);
    assert_int_equal(b->spool.overflow, CONF_SPOOL_DROP_OLDEST);
    assert_int_equal(b->spool.commit_interval_ms, 0);
    assert_int_equal(b->spool.commit_gap_ms, 2);
    assert_true(b->spool.qos0_offline_spool);
    assert_int_equal(b->rate.max_msgs_per_s, 100);
    assert_int_equal(b->rate.max_bytes_per_s, 64 * 1024);
    conf_free(conf);
}

/* Every accepted spelling of a host, and what is stored. */
static void test_hosts(void **state)
{
    static const struct {
        const char *name;
        const char *host;
    } expected[] = {
        {"dns", "broker.example.com"},
        {"fqdn", "broker.example.com"}, /* trailing dot dropped (RFC 6066 §3) */
        {"single", "localhost"},
        {"digits-label", "1und1.de"},
        {"ipv4", "192.0.2.1"},
        {"ipv6", "2001:db8::1"},
        {"ipv6-brackets", "2001:db8::1"},
        {"long-label", "a23456789012345678901234567890123456789012345678901234567890123.example"},
    };
    struct conf *conf = load_ok("good-hosts.yaml");

    assert_int_equal(conf->uplink_count, ARRAY_SIZE(expected));
    for (size_t i = 0; i < ARRAY_SIZE(expected); i++) {
        const struct conf_uplink *up = conf_uplink_find(conf, expected[i].name);
        assert_non_null(up);
        assert_string_equal(up->host, expected[i].host);
    }
    conf_free(conf);
}

/* YAML merge keys: the mapping's own keys win, then merged ones in order. */
static void test_merge_keys(void **state)
{
    struct conf *conf = load_ok("good-merge.yaml");
    const struct conf_uplink *primary, *backup, *third;

    assert_int_equal(conf->uplink_count, 3);
    primary = conf_uplink_find(conf, "primary");
    backup = conf_uplink_find(conf, "backup");
    third = conf_uplink_find(conf, "third");
    assert_non_null(primary);
    assert_non_null(backup);
    assert_non_null(third);
    assert_null(conf_uplink_find(conf, "ignored"));
    assert_string_equal(backup->host, "backup.example.com");
    assert_int_equal(backup->port, 18883);
    assert_int_equal(primary->port, 8883);
    assert_int_equal(backup->keepalive_s, 30);
    assert_string_equal(backup->auth.username, "shared");
    assert_string_equal(backup->auth.password, "pw");
    assert_string_equal(backup->tls.ca_file, primary->tls.ca_file);
    assert_int_equal(third->keepalive_s, 45); /* first merged mapping wins */
    assert_string_equal(third->host, "198.51.100.7");
    assert_string_equal(third->tls.ca_file, primary->tls.ca_file);
    assert_string_equal(third->auth.username, "shared");
    conf_free(conf);
}

/* The shipped /etc/uplinkd/uplinkd.yaml must load as is, and its values
 * must be the documented defaults. */
static void test_reference_config(void **state)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    char *errors = NULL;
    const struct conf_uplink *up;
    int rc;

    snprintf(path, sizeof(path), "%s/../../../conf/uplinkd.yaml", data_dir());
    rc = conf_load(path, &conf, &errors);
    if (rc != 0)
        fail_msg("%s: %s", path, errors ? errors : "(no message)");
    assert_int_equal(conf->local.listen_count, 2);
    assert_int_equal(conf->local.socket_mode, 0660);
    assert_int_equal(conf->local.max_packet_size, 256 * 1024);
    assert_int_equal(conf->local.max_clients, 1024);
    assert_int_equal(conf->local.max_pending_connects, 128);
    assert_int_equal(conf->local.max_pending_per_uid, 32);
    assert_int_equal(conf->local.connect_deadline_ms, 5000);
    assert_string_equal(conf->local.topic_prefix, "dev");
    assert_string_equal(conf->state_dir, "/var/lib/uplinkd");
    assert_string_equal(conf->control_socket, "/run/uplinkd/control.sock");
    assert_int_equal(conf->log_level, LOG_INFO);
    assert_int_equal(conf->shutdown_timeout_ms, 5000);
    assert_int_equal(conf->uplink_count, 1);
    up = conf_uplink_find(conf, "cloud");
    assert_non_null(up);
    assert_int_equal(up->port, 8883);
    assert_true(up->tls.enabled);
    assert_true(up->tls.ca_system);
    assert_null(up->tls.ca_file);
    assert_int_equal(up->auth.type, CONF_AUTH_NONE);
    assert_int_equal(up->keepalive_s, 60);
    assert_int_equal(up->reconnect_base_ms, 1000);
    assert_int_equal(up->reconnect_cap_ms, 120000);
    assert_int_equal(up->max_queued_messages, 10000);
    assert_int_equal(up->max_inflight, 100);
    assert_string_equal(up->client_id, conf->gateway_id);
    assert_string_equal(generic_conf(up)->topic_prefix, conf->gateway_id);
    assert_int_equal(conf->route_count, 0);
    conf_free(conf);
}

/* ------------------------------------------------------------------------ */

struct bad_case {
    const char *file;
    const char *expect[10]; /* substrings of the error text; the first names file:line:col */
};

static const struct bad_case bad_cases[] = {
    {"bad-pending.yaml",
     {"bad-pending.yaml:4:25: local.max_pending_connects: \"0\" is not a connection count "
      "(expected an integer 1-65536)",
      "bad-pending.yaml:5:24: local.max_pending_per_uid: \"many\" is not a connection count",
      "bad-pending.yaml:6:21: local.connect_deadline: \"50ms\" is out of range (expected 100ms "
      "to 5m)"}},
    {"bad-pending-uid.yaml",
     {"bad-pending-uid.yaml:5:24: local.max_pending_per_uid: 16 is above "
      "local.max_pending_connects (8), so it would never apply",
      "bad-pending-uid.yaml:6:21: local.connect_deadline: \"10m\" is out of range"}},
    {"bad-spool.yaml",
     {"bad-spool.yaml:6:19: uplinks[0].max_inflight: \"20000\" is not a message count (expected "
      "an integer 1-10000)",
      "bad-spool.yaml:13:7: uplinks[0].spool.colour: unknown key",
      "bad-spool.yaml:8:19: uplinks[0].spool.durability: \"sometimes\" is not valid (expected "
      "fsync or none)",
      "bad-spool.yaml:9:18: uplinks[0].spool.max_bytes: \"1KiB\" is out of range",
      "bad-spool.yaml:10:17: uplinks[0].spool.overflow: \"drop-newest\" is not valid (expected "
      "block or drop-oldest)",
      "bad-spool.yaml:11:24: uplinks[0].spool.commit_interval: \"5s\" is out of range",
      "bad-spool.yaml:12:21: uplinks[0].spool.qos0_offline: \"keep\" is not valid",
      "bad-spool.yaml:15:23: uplinks[0].rate.max_msgs_per_s: \"0\"",
      "bad-spool.yaml:18:19: uplinks[1].max_inflight: \"0\" is not a message count",
      "bad-spool.yaml:20:19: uplinks[1].spool.commit_gap: \"2s\" is out of range (expected 0s "
      "to 1s)"}},
    {"bad-gcp.yaml",
     {"bad-gcp.yaml:7:16: uplinks[0].client_id: is set by profile gcp",
      "bad-gcp.yaml:12:16: uplinks[0].gcp.project: \"my/project\": contains a character other",
      "bad-gcp.yaml:12:7: uplinks[0].gcp.registry: missing (required: the device registry id)",
      "bad-gcp.yaml:14:15: uplinks[0].gcp.device: \"goog-1\": GCP device ids must not start "
      "with \"goog\"",
      "bad-gcp.yaml:15:20: uplinks[0].gcp.attach_idle: is only used with gateway: true",
      "bad-gcp.yaml:20:56: uplinks[1].gcp.device: \"ab\": GCP device ids are 3 to 255",
      "bad-gcp.yaml:16:5: uplinks[1].auth: GCP IoT Core needs type jwt",
      "bad-gcp.yaml:25:10: uplinks[2].gcp: is only used with profile: gcp",
      "bad-gcp.yaml:21:5: uplinks[2].auth.alg: PS256 is not accepted by akenza",
      "bad-gcp.yaml:26:29: uplinks[2].akenza.session_idle: is only used with child_key"}},
    {"bad-port.yaml",
     {"bad-port.yaml:6:11: uplinks[0].port: \"99999\" is not a port (expected an integer "
      "1-65535)"}},
    {"bad-unknown-key.yaml",
     {"bad-unknown-key.yaml:5:5: uplinks[0].hots: unknown key (did you mean \"host\"?)"}},
    {"bad-unknown-key-far.yaml",
     {"bad-unknown-key-far.yaml:3:1: frobnicate: unknown key (expected one of: gateway, "}},
    {"bad-type-mapping.yaml",
     {"bad-type-mapping.yaml:6:10: uplinks[0].tls: expected a mapping, found a scalar "
      "(\"yes\")"}},
    {"bad-type-sequence.yaml",
     {"bad-type-sequence.yaml:4:3: uplinks: expected a sequence", "found a mapping"}},
    {"bad-type-scalar.yaml",
     {"bad-type-scalar.yaml:2:7: gateway.id: expected a string, found a sequence"}},
    {"bad-top-level.yaml", {"bad-top-level.yaml:1:1: (top level): expected a mapping"}},
    {"bad-missing-id.yaml", {"bad-missing-id.yaml:2:3: gateway.id: missing (required"}},
    {"bad-missing-gateway.yaml", {"bad-missing-gateway.yaml:1:1: gateway.id: missing"}},
    {"bad-missing-host.yaml", {"bad-missing-host.yaml:4:5: uplinks[0].host: missing (required"}},
    {"bad-missing-name.yaml", {"bad-missing-name.yaml:4:5: uplinks[0].name: missing (required"}},
    {"bad-host-space.yaml",
     {"bad-host-space.yaml:5:11: uplinks[0].host: \"broker example.com\" contains a space",
      "(expected a DNS name, an IPv4 address or an IPv6 address)"}},
    {"bad-host-chars.yaml",
     {"bad-host-chars.yaml:5:11: uplinks[0].host: \"broker_1.example.com\" contains '_' at "
      "position 7"}},
    {"bad-host-url.yaml",
     {"bad-host-url.yaml:5:11: uplinks[0].host: \"mqtts://broker.example.com:8883\" is a URL"}},
    {"bad-host-empty.yaml", {"bad-host-empty.yaml:5:11: uplinks[0].host: \"\" is empty"}},
    {"bad-host-port.yaml",
     {"bad-host-port.yaml:5:11: uplinks[0].host: \"broker.example.com:8883\" contains a port"}},
    {"bad-duration.yaml",
     {"bad-duration.yaml:3:19: shutdown_timeout: \"5 seconds\" is not a duration (expected e.g."}},
    {"bad-size.yaml",
     {"bad-size.yaml:4:20: local.max_packet_size: \"256K\" is not a size (expected e.g."}},
    {"bad-listen-scheme.yaml",
     {"bad-listen-scheme.yaml:6:7: local.listen[1]: \"mqtt://127.0.0.1:1884\" has an unknown "
      "scheme (expected tcp://HOST:PORT or unix:///PATH)"}},
    {"bad-listen-relative.yaml",
     {"bad-listen-relative.yaml:4:13: local.listen[0]: \"unix://run/uplinkd/local.sock\" has a "
      "relative socket path"}},
    {"bad-listen-host.yaml",
     {"bad-listen-host.yaml:5:7: local.listen[0]: \"tcp://gateway.example.com:1883\" has host "
      "\"gateway.example.com\", which is not an IP address"}},
    {"bad-listen-port.yaml",
     {"bad-listen-port.yaml:5:7: local.listen[0]: \"tcp://127.0.0.1:70000\" has an invalid "
      "port"}},
    {"bad-duplicate-uplink.yaml",
     {"bad-duplicate-uplink.yaml:6:11: uplinks[1].name: \"cloud\" is already the name of "
      "uplinks[0] at ",
      "bad-duplicate-uplink.yaml:4:11 (names must be unique)"}},
    {"bad-route-unknown.yaml",
     {"bad-route-unknown.yaml:8:15: routes[0].uplinks[0]: \"clod\" is not the name of an uplink "
      "(did you mean \"cloud\"?)"}},
    {"bad-auth-no-username.yaml",
     {"bad-auth-no-username.yaml:7:7: uplinks[0].auth.username: missing (required with type "
      "basic"}},
    {"bad-auth-none-username.yaml",
     {"bad-auth-none-username.yaml:7:17: uplinks[0].auth.username: is set but "
      "uplinks[0].auth.type is none"}},
    {"bad-cert-no-key.yaml",
     {"bad-cert-no-key.yaml:7:13: uplinks[0].tls.cert: is set without uplinks[0].tls.key"}},
    {"bad-key-no-cert.yaml",
     {"bad-key-no-cert.yaml:7:12: uplinks[0].tls.key: is set without uplinks[0].tls.cert"}},
    {"bad-password-both.yaml",
     {"bad-password-both.yaml:10:22: uplinks[0].auth.password_file: is set together with "
      "uplinks[0].auth.password (line 9, column 17); use only one"}},
    {"bad-password-file.yaml",
     {"bad-password-file.yaml:9:22: uplinks[0].auth.password_file: cannot read \"",
      "/conf/does-not-exist.txt\": No such file or directory"}},
    {"bad-ca-unreadable.yaml",
     {"bad-ca-unreadable.yaml:7:11: uplinks[0].tls.ca: cannot read "
      "\"/nonexistent/uplinkd-test/ca.pem\": No such file or directory"}},
    {"bad-tls-disabled-cert.yaml",
     {"bad-tls-disabled-cert.yaml:8:13: uplinks[0].tls.cert: has no effect because "
      "uplinks[0].tls.enabled is false",
      "bad-tls-disabled-cert.yaml:9:12: uplinks[0].tls.key: has no effect"}},
    {"bad-syntax.yaml",
     {"bad-syntax.yaml:7:1: YAML syntax error: found unexpected end of stream (while scanning a "
      "quoted scalar at line 5, column 11)"}},
    {"bad-syntax-indent.yaml",
     {"bad-syntax-indent.yaml:3:2: YAML syntax error: did not find expected key"}},
    {"bad-encoding.yaml",
     {"bad-encoding.yaml:2:10: YAML syntax error: invalid leading UTF-8 octet"}},
    {"bad-empty.yaml", {"bad-empty.yaml:1:1: the file is empty"}},
    {"bad-comments-only.yaml", {"bad-comments-only.yaml:1:1: the file is empty"}},
    {"bad-duplicate-key.yaml",
     {"bad-duplicate-key.yaml:7:5: uplinks[0].host: duplicate key (first set at line 5, column "
      "5"}},
    {"bad-profile.yaml",
     {"bad-profile.yaml:5:14: uplinks[0].profile: \"nonesuch\" is not a known profile "
      "(expected one of: generic, cumulocity"}},
    {"bad-uplink-name.yaml",
     {"bad-uplink-name.yaml:4:11: uplinks[0].name: \"my cloud\" contains a space (expected 1-64 "
      "characters from A-Z a-z 0-9 _ -"}},
    {"bad-gateway-id.yaml", {"bad-gateway-id.yaml:2:7: gateway.id: \"gw/0001\" contains '/'"}},
    {"bad-control-char.yaml",
     {"bad-control-char.yaml:2:7: gateway.id: \"gw\\x01\" contains a control character"}},
    {"bad-socket-mode.yaml",
     {"bad-socket-mode.yaml:4:16: local.socket_mode: \"660\" is not a file mode (expected octal "
      "permission bits with a leading 0"}},
    {"bad-log-level.yaml",
     {"bad-log-level.yaml:4:10: log.level: \"verbose\" is not a log level (expected error, "
      "warning, notice, info or debug)"}},
    {"bad-keepalive.yaml",
     {"bad-keepalive.yaml:6:16: uplinks[0].keepalive: \"3s\" is not a valid keep alive"}},
    {"bad-reconnect.yaml",
     {"bad-reconnect.yaml:8:12: uplinks[0].reconnect.cap: cap (5s) is shorter than base (10s)"}},
    {"bad-bool.yaml", {"bad-bool.yaml:6:20: uplinks[0].clean_session: \"maybe\" is not a boolean"}},
    {"bad-two-documents.yaml", {"bad-two-documents.yaml:3:1: a second YAML document starts here"}},
    {"bad-merge.yaml",
     {"bad-merge.yaml:4:9: uplinks[0].<<: expected a mapping or a list of mappings to merge, "
      "found a scalar (\"broker.example.com\")",
      "bad-merge.yaml:4:5: uplinks[0].host: missing"}},
    {"bad-hosts.yaml",
     {"bad-hosts.yaml:4:21: uplinks[0].host: \"-bad.example.com\" has a label that starts with '-'",
      "bad-hosts.yaml:5:21: uplinks[1].host: \"bad-.example.com\" has a label that ends with '-'",
      "bad-hosts.yaml:6:21: uplinks[2].host: \"a..b\" has an empty label",
      "bad-hosts.yaml:7:21: uplinks[3].host: \".example.com\" has an empty label",
      "bad-hosts.yaml:8:21: uplinks[4].host: \"1.2.3.256\" is not a valid IPv4 address",
      "bad-hosts.yaml:9:21: uplinks[5].host: \"[::1\" is not a valid IPv6 address",
      "bad-hosts.yaml:10:21: uplinks[6].host: \"fe80::1%eth0\" is not a valid IPv6 address",
      "bad-hosts.yaml:11:21: uplinks[7].host: \"a2345678901234567890123456789012"
      "34567890123456789012345678901234.example\" has a label longer than 63 characters",
      "bad-hosts.yaml:12:21: uplinks[8].host: \"[192.0.2.1]\" is not a valid IPv6 address",
      "bad-hosts.yaml:13:21: uplinks[9].host: \"br\xc3\xb6ker.example.com\" contains a non-ASCII "
      "character at position 3 (write an internationalized name in its ASCII xn-- form)"}},
    {"bad-acl-pattern.yaml",
     {"bad-acl-pattern.yaml:6:26: local.acl[0].publish[1]: \"dev/x%c/#\": \"%c\" and \"%u\" must "
      "be a whole topic level"}},
    {"bad-acl-children.yaml",
     {"bad-acl-children.yaml:6:17: local.acl[0].children: has no effect: no publish or subscribe "
      "pattern of this rule uses \"%c\""}},
    {"bad-acl-uid.yaml",
     {"bad-acl-uid.yaml:5:12: local.acl[0].uid: \"modbus\" is not a numeric user id",
      "bad-acl-uid.yaml:8:7: local.acl[1].sbuscribe: unknown key (did you mean \"subscribe\"?)"}},
    {"bad-acl-deny.yaml",
     {"bad-acl-deny.yaml:6:24: local.acl[0].deny_subscribe[0]: \"test/#/x\": '#' must be a whole "
      "last level (§4.7.1-2) (expected topic patterns to refuse, e.g. [\"test/nosubscribe\", "
      "\"dev/+/config\"])",
      "bad-acl-deny.yaml:7:30: local.acl[0].deny_publish[1]: \"bad+\": '+' must occupy a whole "
      "level",
      "bad-acl-deny.yaml:8:7: local.acl[0].deny_subscibe: unknown key (did you mean "
      "\"deny_subscribe\"?)"}},
    {"bad-acl-child-glob.yaml",
     {"bad-acl-child-glob.yaml:6:18: local.acl[0].children[0]: \"modbus/*\": a child id glob "
      "cannot contain '/', '+' or '#'"}},
    {"bad-password-plain.yaml",
     {"bad-password-plain.yaml:4:18: local.password_file: ",
      "/conf/local-passwd-plain.txt: line 2: user \"alice\": the password is in plain text, which "
      "uplinkd refuses (store a salted hash: run \"uplinkctl passwd FILE USER\" to set it)"}},
    {"bad-local-password-missing.yaml",
     {"bad-local-password-missing.yaml:4:18: local.password_file: cannot read \"",
      "/conf/no-such-passwd.txt\": No such file or directory"}},
    {"bad-many.yaml",
     {"bad-many.yaml:5:10: log.level: \"loud\"", "bad-many.yaml:10:11: uplinks[0].port: \"0\"",
      "bad-many.yaml:13:17: uplinks[1].max_queued: \"lots\" is not a message count"}},
    {"bad-jwt-key.yaml",
     {"bad-jwt-key.yaml:8:12: uplinks[0].auth.key: key file ",
      "/conf/ca.pem holds a certificate, not a private key"}},
    {"bad-jwt-alg.yaml",
     {"bad-jwt-alg.yaml:8:12: uplinks[0].auth.alg: alg ES384 needs a key on curve P-384, but the "
      "key is EC P-256",
      "bad-jwt-alg.yaml:15:12: uplinks[1].auth.alg: \"es256\" is not an algorithm name (JWS "
      "names are case-sensitive: write ES256)"}},
    {"bad-jwt-keys.yaml",
     {"bad-jwt-keys.yaml:8:17: uplinks[0].auth.password: is not used with type jwt",
      "bad-jwt-keys.yaml:9:17: uplinks[0].auth.lifetime: \"25h\" is out of range (expected 10s "
      "to 24h)",
      "bad-jwt-keys.yaml:10:16: uplinks[0].auth.refresh: \"100\" is not a valid refresh point",
      "bad-jwt-keys.yaml:11:17: uplinks[0].auth.claims.iat: is set by uplinkd",
      "bad-jwt-keys.yaml:12:20: uplinks[0].auth.clock_check: \"ntp\" is not a clock check",
      "bad-jwt-keys.yaml:19:12: uplinks[1].auth.aud: is only used with type jwt"}},
    {"bad-jwt-missing.yaml",
     {"bad-jwt-missing.yaml:7:7: uplinks[0].auth.key: missing (required with type jwt",
      "bad-jwt-missing.yaml:7:7: uplinks[0].auth.aud: missing (required with type jwt and the "
      "generic profile"}},
    {"bad-tls-options.yaml",
     {"bad-tls-options.yaml:7:20: uplinks[0].tls.min_version: \"tls1.1\" is not a TLS version",
      "bad-tls-options.yaml:8:13: uplinks[0].tls.alpn: has 2 protocols, but libmosquitto 2.0 "
      "offers only one",
      "bad-tls-options.yaml:9:17: uplinks[0].tls.insecure: \"sometimes\" is not a boolean"}},
};

/* Every line must start "PATH:LINE:COLUMN: " with PATH as given to
 * conf_load(), so editors can jump to it. */
static void assert_lines_well_formed(const char *path, const char *errors)
{
    const char *line = errors;
    size_t path_len = strlen(path);

    while (line != NULL && *line != '\0') {
        const char *p = line;
        const char *end = strchr(line, '\n');
        int fields = 0;

        if (strncmp(p, path, path_len) != 0 || p[path_len] != ':')
            fail_msg("line does not start with %s: %s", path, line);
        p += path_len + 1;
        for (; fields < 2; fields++) {
            if (*p < '1' || *p > '9')
                fail_msg("no line:column in: %s", line);
            while (*p >= '0' && *p <= '9')
                p++;
            if (*p != ':')
                fail_msg("no line:column in: %s", line);
            p++;
        }
        if (*p != ' ')
            fail_msg("no message after line:column in: %s", line);
        line = end ? end + 1 : NULL;
    }
}

static void test_bad_files(void **state)
{
    for (size_t i = 0; i < ARRAY_SIZE(bad_cases); i++) {
        const struct bad_case *c = &bad_cases[i];
        char path[PATH_MAX];
        struct conf *conf = (struct conf *)0x1;
        char *errors = NULL;
        int rc;

        fixture_path(path, sizeof(path), c->file);
        rc = conf_load(path, &conf, &errors);
        if (rc != -EINVAL)
            fail_msg("%s: conf_load() = %d, expected -EINVAL; errors: %s", c->file, rc,
                     errors ? errors : "(none)");
        assert_null(conf);
        assert_non_null(errors);
        for (size_t j = 0; j < ARRAY_SIZE(c->expect) && c->expect[j] != NULL; j++) {
            if (strstr(errors, c->expect[j]) == NULL)
                fail_msg("%s: expected\n  %s\nin\n  %s", c->file, c->expect[j], errors);
        }
        assert_lines_well_formed(path, errors);
        free(errors);
    }
}

/* local.password_file and local.acl (evaluation itself: test_access.c). */
static void test_local_access(void **state)
{
    struct conf *conf = load_ok("good-acl.yaml");
    const struct conf_local *local = &conf->local;
    const struct conf_acl_rule *rule;

    assert_non_null(strstr(local->password_file, "/conf/local-passwd-good.txt"));
    assert_non_null(local->passwords);
    assert_non_null(access_passwords_find(local->passwords, "alice", 5));
    assert_non_null(access_passwords_find(local->passwords, "bob", 3));
    assert_int_equal(local->acl_count, 4);
    rule = &local->acl[0];
    assert_true(rule->has_uid);
    assert_int_equal(rule->uid, 1001);
    assert_false(rule->has_gid);
    assert_null(rule->user);
    assert_int_equal(rule->children_count, 1);
    assert_string_equal(rule->children[0], "modbus-*");
    assert_int_equal(rule->publish_count, 1);
    assert_string_equal(rule->publish[0], "dev/%c/#");
    assert_int_equal(rule->subscribe_count, 2);
    assert_string_equal(rule->subscribe[1], "dev/%c/config");
    rule = &local->acl[1];
    assert_true(rule->has_gid);
    assert_int_equal(rule->gid, 27);
    assert_int_equal(rule->subscribe_count, 0);
    rule = &local->acl[2];
    assert_string_equal(rule->user, "alice");
    assert_int_equal(rule->subscribe_count, 0);
    rule = &local->acl[3];
    assert_false(rule->has_uid || rule->has_gid || rule->user);
    assert_string_equal(rule->publish[0], "#");
    assert_int_equal(rule->deny_publish_count, 1);
    assert_string_equal(rule->deny_publish[0], "dev/+/config");
    assert_int_equal(rule->deny_subscribe_count, 2);
    assert_string_equal(rule->deny_subscribe[0], "test/nosubscribe");
    assert_string_equal(rule->deny_subscribe[1], "dev/%c/secret");
    assert_int_equal(local->acl[0].deny_publish_count + local->acl[0].deny_subscribe_count, 0);
    conf_free(conf);

    /* Without the keys: no passwords, no rules (everything allowed). */
    conf = load_ok("good-minimal.yaml");
    assert_null(conf->local.password_file);
    assert_null(conf->local.passwords);
    assert_int_equal(conf->local.acl_count, 0);
    conf_free(conf);
}

/* All mistakes in a file are reported in one run, not only the first. */
static void test_collects_all_errors(void **state)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    char *errors = NULL;
    size_t lines = 1;

    fixture_path(path, sizeof(path), "bad-many.yaml");
    assert_int_equal(conf_load(path, &conf, &errors), -EINVAL);
    for (const char *p = errors; *p; p++)
        lines += *p == '\n';
    assert_int_equal(lines, 5);
    assert_non_null(strstr(errors, "shutdown_timeout: \"soon\" is not a duration"));
    assert_non_null(strstr(errors, "uplinks[0].host: \"bad host\" contains a space"));
    free(errors);
}

static void test_unreadable(void **state)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    char *errors = NULL;

    fixture_path(path, sizeof(path), "no-such-file.yaml");
    assert_int_equal(conf_load(path, &conf, &errors), -ENOENT);
    assert_null(conf);
    assert_non_null(strstr(errors, "cannot read "));
    assert_non_null(strstr(errors, "no-such-file.yaml: No such file or directory"));
    free(errors);

    fixture_path(path, sizeof(path), "");
    assert_int_equal(conf_load(path, &conf, &errors), -EISDIR);
    assert_non_null(strstr(errors, ": Is a directory"));
    free(errors);

    /* Root reads anything, so permission denied can only be seen as a user. */
    if (geteuid() != 0) {
        char tmp[] = "/tmp/test_conf_XXXXXX";
        int fd = mkstemp(tmp);
        char expected[sizeof(tmp) + 64];

        assert_true(fd >= 0);
        close(fd);
        assert_int_equal(chmod(tmp, 0), 0);
        assert_int_equal(conf_load(tmp, &conf, &errors), -EACCES);
        snprintf(expected, sizeof(expected), "cannot read %s: Permission denied", tmp);
        assert_string_equal(errors, expected);
        free(errors);
        unlink(tmp);
    }
}

static void test_too_large(void **state)
{
    char tmp[] = "/tmp/test_conf_XXXXXX";
    int fd = mkstemp(tmp);
    struct conf *conf = NULL;
    char *errors = NULL;
    char block[4096];

    assert_true(fd >= 0);
    memset(block, '#', sizeof(block));
    for (int i = 0; i < 300; i++) /* 1.2 MiB of comment */
        assert_int_equal(write(fd, block, sizeof(block)), sizeof(block));
    close(fd);
    assert_int_equal(conf_load(tmp, &conf, &errors), -EFBIG);
    assert_non_null(strstr(errors, "larger than 1 MiB"));
    free(errors);
    unlink(tmp);
}

/* A password file written on Windows ends in CRLF; neither byte belongs to
 * the password. Written at test time to a temporary directory, which also
 * checks that relative paths follow the config file, not the cwd. */
static void test_password_file_crlf(void **state)
{
    char dir[] = "/tmp/test_conf_dir_XXXXXX";
    char conf_path[64], secret_path[64];
    struct conf *conf = NULL;
    char *errors = NULL;
    FILE *f;

    assert_non_null(mkdtemp(dir));
    snprintf(conf_path, sizeof(conf_path), "%s/u.yaml", dir);
    snprintf(secret_path, sizeof(secret_path), "%s/secret", dir);
    f = fopen(secret_path, "w");
    assert_non_null(f);
    fputs("pa ss\r\n", f);
    fclose(f);
    f = fopen(conf_path, "w");
    assert_non_null(f);
    fputs("gateway: {id: g}\n"
          "uplinks:\n"
          "  - {name: u, host: 192.0.2.1, tls: {enabled: false},\n"
          "     auth: {type: basic, username: x, password_file: secret}}\n",
          f);
    fclose(f);
    assert_int_equal(conf_load(conf_path, &conf, &errors), 0);
    assert_string_equal(conf->uplinks[0].auth.password, "pa ss");
    assert_string_equal(conf->uplinks[0].host, "192.0.2.1");
    conf_free(conf);
    unlink(secret_path);
    unlink(conf_path);
    rmdir(dir);
}

static void test_uplink_find_and_equal(void **state)
{
    struct conf *a = load_ok("good-full.yaml");
    struct conf *b = load_ok("good-full.yaml");
    const struct conf_uplink *up_a = conf_uplink_find(a, "hivemq");
    const struct conf_uplink *up_b = conf_uplink_find(b, "hivemq");
    struct conf_uplink copy;
    char other_password[] = "other";

    assert_ptr_equal(up_a, &a->uplinks[0]);
    assert_ptr_equal(conf_uplink_find(a, "plain_local-2"), &a->uplinks[1]);
    assert_null(conf_uplink_find(a, "HIVEMQ"));
    assert_null(conf_uplink_find(a, ""));

    /* Same text, separate allocations: equal. */
    assert_true(conf_uplink_equal(up_a, up_b));
    assert_true(conf_uplink_equal(up_a, up_a));
    assert_false(conf_uplink_equal(&a->uplinks[0], &b->uplinks[1]));

    /* Settings the uplink adopts while running do not force a reconnect. */
    copy = *up_a;
    copy.reconnect_base_ms = 5;
    copy.reconnect_cap_ms = 7;
    copy.max_queued_messages = 1;
    struct conf_generic generic = *generic_conf(up_a);
    generic.topic_prefix = other_password;
    copy.section = &generic;
    assert_true(conf_uplink_equal(up_a, &copy));

    /* Anything in the session does. */
    copy = *up_a;
    copy.port = 1;
    assert_false(conf_uplink_equal(up_a, &copy));
    copy = *up_a;
    copy.auth.password = other_password;
    assert_false(conf_uplink_equal(up_a, &copy));
    copy = *up_a;
    copy.auth.password = NULL;
    assert_false(conf_uplink_equal(up_a, &copy));
    copy = *up_a;
    copy.tls.key = NULL;
    assert_false(conf_uplink_equal(up_a, &copy));
    copy = *up_a;
    copy.keepalive_s = 61;
    assert_false(conf_uplink_equal(up_a, &copy));
    copy = *up_a;
    copy.clean_session = !copy.clean_session;
    assert_false(conf_uplink_equal(up_a, &copy));
    copy = *up_a;
    copy.client_id = other_password;
    assert_false(conf_uplink_equal(up_a, &copy));

    conf_free(a);
    conf_free(b);
}

/* ------------------------------------------------------------------------ */
/* util                                                                      */

/* Profiles gcp and akenza: the session defaults their sections imply. */
static void test_gcp_akenza(void **state)
{
    struct conf *conf = load_ok("good-gcp.yaml");
    const struct conf_uplink *up;

    (void)state;
    up = conf_uplink_find(conf, "gcp");
    assert_string_equal(gcp_conf(up)->project, "my-project");
    assert_string_equal(gcp_conf(up)->region, "europe-west1");
    assert_string_equal(gcp_conf(up)->registry, "reg-1");
    assert_string_equal(gcp_conf(up)->device, "gw-cloud"); /* gateway.id */
    assert_true(gcp_conf(up)->gateway);
    assert_int_equal(gcp_conf(up)->attach_idle_ms, 10 * 60 * 1000);
    assert_string_equal(gcp_conf(up)->child_key, "/etc/uplinkd/devices/%c.pem");
    assert_string_equal(up->auth.jwt.aud, "my-project"); /* aud = the project id */
    assert_string_equal(up->auth.username, "unused");
    assert_int_equal(up->auth.jwt.max_lifetime_s, 24 * 3600);
    assert_int_equal(up->rate.max_msgs_per_s, 100); /* GCP: 100 messages/s per connection */

    up = conf_uplink_find(conf, "clearblade");
    assert_string_equal(gcp_conf(up)->device, "dev-2");
    assert_false(gcp_conf(up)->gateway);
    assert_int_equal(gcp_conf(up)->attach_idle_ms, 30 * 60 * 1000);
    assert_null(gcp_conf(up)->child_key);
    assert_string_equal(up->auth.jwt.aud, "explicit-aud");
    assert_int_equal(up->rate.max_msgs_per_s, 50); /* the operator's own */

    /* A rate section without max_msgs_per_s keeps GCP's 100 messages/s. */
    up = conf_uplink_find(conf, "gcp-bytes");
    assert_int_equal(up->rate.max_bytes_per_s, 64 * 1024);
    assert_int_equal(up->rate.max_msgs_per_s, 100);

    up = conf_uplink_find(conf, "akenza");
    assert_string_equal(akenza_conf(up)->device, "gw-cloud");
    assert_string_equal(up->auth.jwt.aud, "https://akenza.io/devices/gw-cloud");
    assert_int_equal(up->auth.jwt.kid_mode, JWT_KID_FINGERPRINT);
    assert_int_equal(up->auth.jwt.claim_count, 1);
    assert_string_equal(up->auth.jwt.claims[0].name, "sub");
    assert_string_equal(up->auth.jwt.claims[0].value, "gw-cloud");
    assert_string_equal(akenza_conf(up)->child_key, "/etc/uplinkd/devices/%c.key");
    assert_int_equal(akenza_conf(up)->session_idle_ms, 5 * 60 * 1000);

    up = conf_uplink_find(conf, "akenza-old");
    assert_string_equal(akenza_conf(up)->device, "abc123");
    assert_null(akenza_conf(up)->child_key);
    assert_int_equal(akenza_conf(up)->session_idle_ms, 10 * 60 * 1000);
    assert_string_equal(up->auth.jwt.aud, "abc123");
    assert_int_equal(up->auth.jwt.kid_mode, JWT_KID_VALUE);
    assert_int_equal(up->auth.jwt.claim_count, 1);
    assert_string_equal(up->auth.jwt.claims[0].value, "someone"); /* not replaced */

    /* A changed gcp setting that goes into CONNECT forces a reconnect. */
    struct conf *again = load_ok("good-gcp.yaml");
    assert_true(conf_uplink_equal(&conf->uplinks[0], &again->uplinks[0]));
    ((struct conf_gcp *)again->uplinks[0].section)->gateway = false;
    assert_false(conf_uplink_equal(&conf->uplinks[0], &again->uplinks[0]));
    conf_free(again);
    conf_free(conf);
}

static void test_parse_duration(void **state)
{
    static const struct {
        const char *text;
        int rc;
        uint64_t ms;
    } cases[] = {
        {"250ms", 0, 250},
        {"5s", 0, 5000},
        {"10m", 0, 600000},
        {"1h", 0, 3600000},
        {"2d", 0, 172800000},
        {"30", 0, 30000}, /* bare number: seconds */
        {"0", 0, 0},
        {"0ms", 0, 0},
        {"007s", 0, 7000},
        {"1h30m", 0, 5400000},
        {"1m30s500ms", 0, 90500},
        {"5 s", 0, 5000},
        {"18446744073709551615ms", 0, UINT64_MAX},
        {"213503982334d", 0, 213503982334ULL * 86400000ULL},
        {"213503982335d", -ERANGE, 0},
        {"18446744073709551615", -ERANGE, 0}, /* seconds -> ms overflows */
        {"99999999999999999999ms", -ERANGE, 0},
        {"18446744073709551615ms1ms", -ERANGE, 0},
        {"", -EINVAL, 0},
        {"s", -EINVAL, 0},
        {"ms", -EINVAL, 0},
        {"-1s", -EINVAL, 0},
        {"+1s", -EINVAL, 0},
        {" 5s", -EINVAL, 0},
        {"1.5s", -EINVAL, 0},
        {"5x", -EINVAL, 0},
        {"5sec", -EINVAL, 0},
        {"5min", -EINVAL, 0},
        {"5S", -EINVAL, 0},
        {"1h30", -EINVAL, 0},
        {"1h 30m", -EINVAL, 0},
        {"5s ", -EINVAL, 0},
    };

    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        uint64_t ms = 12345;
        int rc = util_parse_duration_ms(cases[i].text, &ms);
        if (rc != cases[i].rc)
            fail_msg("util_parse_duration_ms(\"%s\") = %d, expected %d", cases[i].text, rc,
                     cases[i].rc);
        if (rc == 0 && ms != cases[i].ms)
            fail_msg("util_parse_duration_ms(\"%s\") gave %llu, expected %llu", cases[i].text,
                     (unsigned long long)ms, (unsigned long long)cases[i].ms);
        if (rc != 0)
            assert_int_equal(ms, 12345); /* untouched on failure */
    }
}

static void test_parse_size(void **state)
{
    static const struct {
        const char *text;
        int rc;
        uint64_t bytes;
    } cases[] = {
        {"512", 0, 512},
        {"0", 0, 0},
        {"512B", 0, 512},
        {"64KiB", 0, 65536},
        {"256MiB", 0, 256ULL << 20},
        {"1GiB", 0, 1ULL << 30},
        {"2TiB", 0, 2ULL << 40},
        {"1kB", 0, 1000},
        {"1KB", 0, 1000},
        {"10MB", 0, 10000000},
        {"3GB", 0, 3000000000ULL},
        {"1TB", 0, 1000000000000ULL},
        {"1 KiB", 0, 1024},
        {"18446744073709551615", 0, UINT64_MAX},
        {"16777215TiB", 0, 16777215ULL << 40},
        {"18446744073709551616", -ERANGE, 0},
        {"16777216TiB", -ERANGE, 0},
        {"", -EINVAL, 0},
        {"KiB", -EINVAL, 0},
        {"1.5MiB", -EINVAL, 0},
        {"1kib", -EINVAL, 0},
        {"1K", -EINVAL, 0},
        {"1 K", -EINVAL, 0},
        {"-1", -EINVAL, 0},
        {"1MiBx", -EINVAL, 0},
        {"1 MiB ", -EINVAL, 0},
        {" 1", -EINVAL, 0},
    };

    for (size_t i = 0; i < ARRAY_SIZE(cases); i++) {
        uint64_t bytes = 12345;
        int rc = util_parse_size(cases[i].text, &bytes);
        if (rc != cases[i].rc)
            fail_msg("util_parse_size(\"%s\") = %d, expected %d", cases[i].text, rc, cases[i].rc);
        if (rc == 0 && bytes != cases[i].bytes)
            fail_msg("util_parse_size(\"%s\") gave %llu, expected %llu", cases[i].text,
                     (unsigned long long)bytes, (unsigned long long)cases[i].bytes);
        if (rc != 0)
            assert_int_equal(bytes, 12345);
    }
}

static void test_read_file(void **state)
{
    char path[PATH_MAX];
    char *text = NULL;
    size_t len = 0;

    fixture_path(path, sizeof(path), "password.txt");
    assert_int_equal(util_read_file(path, 1024, &text, &len), 0);
    assert_int_equal(len, strlen("s3cret pass\n"));
    assert_string_equal(text, "s3cret pass\n");
    free(text);

    /* exactly at the limit is fine, one byte less is not */
    assert_int_equal(util_read_file(path, len, &text, NULL), 0);
    free(text);
    assert_int_equal(util_read_file(path, len - 1, &text, &len), -EFBIG);

    fixture_path(path, sizeof(path), "bad-empty.yaml");
    assert_int_equal(util_read_file(path, 0, &text, &len), 0);
    assert_int_equal(len, 0);
    assert_string_equal(text, "");
    free(text);

    /* procfs reports size 0: reading must not trust st_size */
    assert_int_equal(util_read_file("/proc/self/status", 1 << 20, &text, &len), 0);
    assert_true(len > 0);
    assert_non_null(strstr(text, "Name:"));
    free(text);

    fixture_path(path, sizeof(path), "missing");
    assert_int_equal(util_read_file(path, 1024, &text, &len), -ENOENT);
    fixture_path(path, sizeof(path), "");
    assert_int_equal(util_read_file(path, 1024, &text, &len), -EISDIR);
}

static void test_small_helpers(void **state)
{
    char *copy = util_strdup_or_null("abc");
    uint64_t before, after;

    assert_string_equal(copy, "abc");
    free(copy);
    assert_null(util_strdup_or_null(NULL));

    before = util_now_ms();
    after = util_now_ms();
    assert_true(after >= before);
    assert_true(before > 0);
}

/* auth.type jwt: every key, the defaults, the loaded key, and reload's
 * view of a changed JWT section. */
static void test_jwt(void **state)
{
    struct conf *conf = load_ok("good-jwt.yaml");
    struct conf *again = load_ok("good-jwt.yaml");
    const struct conf_uplink *up = conf_uplink_find(conf, "gcp-like");
    const struct conf_jwt *jwt;

    assert_non_null(up);
    assert_int_equal(up->tls.min_version, CONF_TLS_1_3);
    assert_string_equal(up->tls.alpn, "x-amzn-mqtt-ca");
    assert_true(up->tls.insecure);
    assert_int_equal(up->auth.type, CONF_AUTH_JWT);
    assert_string_equal(up->auth.username, "dev");
    assert_null(up->auth.password);
    jwt = &up->auth.jwt;
    assert_int_equal(jwt->alg, JWT_ALG_PS256);
    assert_non_null(strstr(jwt->key, "/conf/jwt-rsa.key"));
    assert_true(jwt->key[0] == '/');
    assert_non_null(jwt->private_key);
    assert_int_equal(jwt->lifetime_s, 7200);
    assert_int_equal(jwt->max_lifetime_s, 24 * 3600);
    assert_int_equal(jwt->skew_s, 30);
    assert_int_equal(jwt->refresh_percent, 75);
    assert_string_equal(jwt->aud, "my-project");
    assert_int_equal(jwt->kid_mode, JWT_KID_VALUE);
    assert_string_equal(jwt->kid, "key-1");
    assert_int_equal(jwt->claim_count, 2);
    assert_string_equal(jwt->claims[0].name, "sub");
    assert_string_equal(jwt->claims[0].value, "gw-jwt");
    assert_string_equal(jwt->claims[1].name, "tenant");
    assert_int_equal(jwt->clock_check, CONF_CLOCK_BUILD_DATE);

    up = conf_uplink_find(conf, "defaults");
    assert_non_null(up);
    assert_int_equal(up->tls.min_version, CONF_TLS_1_2);
    assert_string_equal(up->tls.alpn, "h2"); /* a plain string works too */
    assert_false(up->tls.insecure);
    assert_string_equal(up->auth.username, "unused"); /* like GCP: ignored by the cloud */
    jwt = &up->auth.jwt;
    assert_int_equal(jwt->alg, JWT_ALG_ES256); /* from the P-256 key */
    assert_int_equal(jwt->lifetime_s, 3600);
    assert_int_equal(jwt->skew_s, 60);
    assert_int_equal(jwt->refresh_percent, 80);
    assert_int_equal(jwt->kid_mode, JWT_KID_FINGERPRINT);
    assert_null(jwt->kid);
    assert_int_equal(jwt->claim_count, 0);
    assert_int_equal(jwt->clock_check, CONF_CLOCK_SYNC);

    /* Same file, same key: equal. A changed JWT setting or TLS option: not. */
    assert_true(conf_uplink_equal(&conf->uplinks[0], &again->uplinks[0]));
    again->uplinks[0].auth.jwt.lifetime_s++;
    assert_false(conf_uplink_equal(&conf->uplinks[0], &again->uplinks[0]));
    again->uplinks[0].auth.jwt.lifetime_s--;
    again->uplinks[0].tls.insecure = false;
    assert_false(conf_uplink_equal(&conf->uplinks[0], &again->uplinks[0]));
    /* A different key under the same settings is a new identity. */
    assert_false(conf_uplink_equal(&conf->uplinks[1], &again->uplinks[0]));
    conf_free(again);
    conf_free(conf);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_full),
        cmocka_unit_test(test_minimal_defaults),
        cmocka_unit_test(test_hosts),
        cmocka_unit_test(test_merge_keys),
        cmocka_unit_test(test_reference_config),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_collects_all_errors),
        cmocka_unit_test(test_local_access),
        cmocka_unit_test(test_unreadable),
        cmocka_unit_test(test_too_large),
        cmocka_unit_test(test_password_file_crlf),
        cmocka_unit_test(test_uplink_find_and_equal),
        cmocka_unit_test(test_jwt),
        cmocka_unit_test(test_gcp_akenza),
        cmocka_unit_test(test_parse_duration),
        cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_read_file),
        cmocka_unit_test(test_small_helpers),
        cmocka_unit_test(test_spool_keys),
        cmocka_unit_test(test_pending_defaults_capped),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
