/* test_access.c - the password file (parse, verify, write) and local.acl
 * evaluation (access.h). */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <grp.h>
#include <netinet/in.h>
#include <pwd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cmocka.h>

#include "access.h"
#include "conf.h"
#include "util.h"

/* Made independently with Python: hashlib.pbkdf2_hmac('sha512', b'secret',
 * b'0123456789abcdef', 1000), both in standard base64. */
#define SECRET_HASH                                                                                \
    "$pbkdf2-sha512$1000$MDEyMzQ1Njc4OWFiY2RlZg==$vgFvU7zWIDgDAUi7d8ayt+cfRiPWVVWfv8iQRsGZ"        \
    "aZviWzsSNgWYXEE5PmvI/VELMsOmEbqLz0PKuePNjOk41A=="
#define ALICE_LINE "alice:" SECRET_HASH

static struct access_passwords *parse_ok(const char *text)
{
    struct access_passwords *pw = NULL;
    char why[512] = "";

    if (access_passwords_parse(text, strlen(text), &pw, why, sizeof(why)) != 0)
        fail_msg("parse failed: %s", why);
    assert_non_null(pw);
    return pw;
}

static void parse_bad(const char *text, const char *expect)
{
    struct access_passwords *pw = (struct access_passwords *)0x1;
    char why[512] = "";

    assert_int_equal(access_passwords_parse(text, strlen(text), &pw, why, sizeof(why)), -EINVAL);
    assert_null(pw);
    if (strstr(why, expect) == NULL)
        fail_msg("expected \"%s\" in \"%s\"", expect, why);
}

static void test_passwd_known_vector(void **state)
{
    struct access_passwords *pw =
        parse_ok("# uplinkd local users\n\n" ALICE_LINE "\r\nbob:" SECRET_HASH);
    const struct access_passwd_entry *alice, *bob;

    assert_int_equal(pw->count, 2);
    alice = access_passwords_find(pw, "alice", 5);
    bob = access_passwords_find(pw, "bob", 3);
    assert_non_null(alice);
    assert_non_null(bob);
    assert_null(access_passwords_find(pw, "alic", 4));
    assert_null(access_passwords_find(pw, "alicee", 6));
    assert_int_equal(alice->iterations, 1000);
    assert_int_equal(alice->salt_len, 16);
    assert_int_equal(alice->hash_len, 64);
    assert_true(access_passwd_verify(alice, "secret", 6));
    assert_false(access_passwd_verify(alice, "Secret", 6));
    assert_false(access_passwd_verify(alice, "secret", 5));
    assert_false(access_passwd_verify(alice, "", 0));
    assert_true(access_passwd_verify(bob, "secret", 6));
    /* Unknown user: the dummy entry never verifies. */
    assert_false(access_passwd_verify(NULL, "secret", 6));
    access_passwords_free(pw);
    access_passwords_free(NULL);
}

static void test_passwd_refused(void **state)
{
    parse_bad("alice:secret\n", "line 1: user \"alice\": the password is in plain text");
    parse_bad("# c\nalice:\n", "line 2: user \"alice\": the password is in plain text");
    parse_bad("alice:$7$101$abc$def\n", "unsupported hash scheme \"$7$\"");
    parse_bad("alice:$6$salt$hash\n", "unsupported hash scheme \"$6$\"");
    parse_bad("alice\n", "line 1: expected USER:$pbkdf2-sha512$");
    parse_bad(":$pbkdf2-sha512$1000$MDEyMzQ1Njc4OWFiY2RlZg==$AAAAAAAAAAAAAAAAAAAAAA==\n",
              "empty user name");
    parse_bad("a:$pbkdf2-sha512$999$MDEyMzQ1Njc4OWFiY2RlZg==$AAAAAAAAAAAAAAAAAAAAAA==\n",
              "999 PBKDF2 iterations are too few");
    parse_bad("a:$pbkdf2-sha512$x$MDEyMzQ1Njc4OWFiY2RlZg==$AAAAAAAAAAAAAAAAAAAAAA==\n",
              "iteration count is not a number");
    parse_bad("a:$pbkdf2-sha512$1000$MDEy*zQ1Njc4OWFiY2RlZg==$AAAAAAAAAAAAAAAAAAAAAA==\n",
              "the salt is not base64");
    parse_bad("a:$pbkdf2-sha512$1000$MDEy$AAAAAAAAAAAAAAAAAAAAAA==\n", "the salt is not base64");
    parse_bad("a:$pbkdf2-sha512$1000$MDEyMzQ1Njc4OWFiY2RlZg==$AAAA\n", "the hash is not base64");
    parse_bad("a:$pbkdf2-sha512$1000$MDEyMzQ1Njc4OWFiY2RlZg==\n", "the salt is not base64");
    parse_bad(ALICE_LINE "\n" ALICE_LINE "\n", "line 2: user \"alice\" is listed twice");
}

static void test_passwd_line_roundtrip(void **state)
{
    struct access_passwords *pw;
    char *line = NULL, *line2 = NULL;
    char why[256];

    assert_int_equal(access_passwd_line("carol", "pa:ss word", 10, 1000, &line, why, sizeof(why)),
                     0);
    assert_non_null(strstr(line, "carol:$pbkdf2-sha512$1000$"));
    pw = parse_ok(line);
    assert_true(access_passwd_verify(&pw->entries[0], "pa:ss word", 10));
    assert_false(access_passwd_verify(&pw->entries[0], "pa:ss wore", 10));
    access_passwords_free(pw);
    /* A fresh salt every time. */
    assert_int_equal(access_passwd_line("carol", "pa:ss word", 10, 1000, &line2, why, sizeof(why)),
                     0);
    assert_string_not_equal(line, line2);
    free(line);
    free(line2);
    assert_int_equal(access_passwd_line("a:b", "x", 1, 1000, &line, why, sizeof(why)), -EINVAL);
    assert_non_null(strstr(why, "':'"));
    assert_int_equal(access_passwd_line("a", "x", 1, 10, &line, why, sizeof(why)), -EINVAL);
}

static void test_passwd_file_set(void **state)
{
    char dir[] = "/tmp/uplinkd-test-access-XXXXXX";
    char path[PATH_MAX], why[512];
    char *line_a = NULL, *line_b = NULL, *line_a2 = NULL, *text = NULL;
    struct access_passwords *pw = NULL;
    struct stat st;
    size_t len;
    FILE *f;

    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/passwd", dir);
    assert_int_equal(access_passwd_line("a", "one", 3, 1000, &line_a, why, sizeof(why)), 0);
    assert_int_equal(access_passwd_line("b", "two", 3, 1000, &line_b, why, sizeof(why)), 0);
    assert_int_equal(access_passwd_line("a", "three", 5, 1000, &line_a2, why, sizeof(why)), 0);

    /* A new file: the directory's group, 0640 (what /etc/uplinkd needs). */
    assert_int_equal(access_passwd_file_set(path, line_b, why, sizeof(why)), 0);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0640);
    unlink(path);

    /* An existing file keeps its mode (and owner: test_uplinkctl.py). */
    f = fopen(path, "w");
    assert_non_null(f);
    fputs("# keep me\n", f);
    fclose(f);
    chmod(path, 0604);
    assert_int_equal(access_passwd_file_set(path, line_a, why, sizeof(why)), 0);
    assert_int_equal(access_passwd_file_set(path, line_b, why, sizeof(why)), 0);
    assert_int_equal(access_passwd_file_set(path, line_a2, why, sizeof(why)), 0);
    assert_int_equal(stat(path, &st), 0);
    assert_int_equal(st.st_mode & 0777, 0604);
    assert_int_equal(util_read_file(path, 65536, &text, &len), 0);
    assert_true(strncmp(text, "# keep me\n", 10) == 0);
    assert_non_null(strstr(text, line_a2));
    assert_null(strstr(text, line_a));
    assert_non_null(strstr(text, line_b));
    free(text);
    assert_int_equal(access_passwords_load(path, &pw, why, sizeof(why)), 0);
    assert_int_equal(pw->count, 2);
    assert_true(access_passwd_verify(access_passwords_find(pw, "a", 1), "three", 5));
    assert_true(access_passwd_verify(access_passwords_find(pw, "b", 1), "two", 3));
    access_passwords_free(pw);

    /* A file in a missing directory: an error in words, nothing left behind. */
    snprintf(path, sizeof(path), "%s/missing/passwd", dir);
    assert_true(access_passwd_file_set(path, line_a, why, sizeof(why)) < 0);
    assert_non_null(strstr(why, "missing"));

    snprintf(path, sizeof(path), "%s/passwd", dir);
    unlink(path);
    rmdir(dir);
    free(line_a);
    free(line_b);
    free(line_a2);
}

/* ------------------------------------------------------------------------ */

static char *pub_modbus[] = {"dev/%c/#"};
static char *sub_modbus[] = {"dev/%c/commands/#", "dev/%c/config"};
static char *children_modbus[] = {"modbus-*"};
static char *pub_user[] = {"users/%u/#", "dev/+/telemetry"};
static char *sub_user[] = {"users/%u/#", "dev/#"};
static char *pub_glob[] = {"dev/plc-?\?/state"};
static char *all[] = {"#"};

static struct conf_acl_rule rules[] = {
    {.has_uid = true,
     .uid = 1001,
     .children = children_modbus,
     .children_count = 1,
     .publish = pub_modbus,
     .publish_count = 1,
     .subscribe = sub_modbus,
     .subscribe_count = 2},
    {.user = "alice",
     .publish = pub_user,
     .publish_count = 2,
     .subscribe = sub_user,
     .subscribe_count = 2},
    {.has_gid = true, .gid = 500, .publish = pub_glob, .publish_count = 1},
    {.has_uid = true,
     .uid = 0,
     .publish = all,
     .publish_count = 1,
     .subscribe = all,
     .subscribe_count = 1},
};

static int check(const struct access_identity *id, enum access_action action, const char *topic)
{
    struct conf_local local = {.acl = rules, .acl_count = ARRAY_SIZE(rules)};

    return access_acl_check(&local, id, action, topic, strlen(topic), NULL);
}

static void test_acl_no_rules(void **state)
{
    struct conf_local local = {0};
    struct access_identity anyone = {0};
    int index = 7;

    assert_int_equal(access_acl_check(&local, &anyone, ACCESS_PUBLISH, "a/b", 3, &index), 0);
    assert_int_equal(index, -1);
    assert_int_equal(access_acl_check(&local, &anyone, ACCESS_SUBSCRIBE, "#", 1, NULL), 0);
}

static void test_acl_child_rule(void **state)
{
    struct access_identity poller = {.has_cred = true, .uid = 1001, .gid = 1001};
    struct conf_local local = {.acl = rules, .acl_count = ARRAY_SIZE(rules)};
    int index = -5;

    assert_int_equal(check(&poller, ACCESS_PUBLISH, "dev/modbus-1/telemetry"), 0);
    assert_int_equal(check(&poller, ACCESS_PUBLISH, "dev/modbus-/state"), 0);
    assert_int_equal(check(&poller, ACCESS_PUBLISH, "dev/modbus-7"), 0); /* "#" covers the parent */
    assert_int_equal(check(&poller, ACCESS_PUBLISH, "dev/plc-01/telemetry"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_PUBLISH, "dev/Modbus-1/telemetry"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_PUBLISH, "dev"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_PUBLISH, "other/modbus-1/x"), -EACCES);
    assert_int_equal(access_acl_check(&local, &poller, ACCESS_PUBLISH, "x", 1, &index), -EACCES);
    assert_int_equal(index, 0);

    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/modbus-1/commands/#"), 0);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/modbus-1/commands/+"), 0);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/modbus-1/commands"), 0);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/modbus-1/config"), 0);
    /* A wildcard in the child position could see other children. */
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/+/commands/#"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/#"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "#"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/modbus-1/+"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/modbus-1/config/x"), -EACCES);
    assert_int_equal(check(&poller, ACCESS_SUBSCRIBE, "dev/plc/commands/#"), -EACCES);
}

static void test_acl_user_rule(void **state)
{
    struct access_identity alice = {.username = "alice"};
    struct access_identity alice_unix = {.has_cred = true, .uid = 1000, .username = "alice"};
    struct access_identity bob = {.username = "bob"};
    struct access_identity slash = {.username = "a/b"};
    struct conf_acl_rule u_rule = {.publish = pub_user, .publish_count = 1};
    struct conf_local local = {.acl = &u_rule, .acl_count = 1};

    assert_int_equal(check(&alice, ACCESS_PUBLISH, "users/alice/x"), 0);
    assert_int_equal(check(&alice, ACCESS_PUBLISH, "users/alice"), 0);
    assert_int_equal(check(&alice, ACCESS_PUBLISH, "users/bob/x"), -EACCES);
    assert_int_equal(check(&alice, ACCESS_PUBLISH, "dev/plc-01/telemetry"), 0);
    assert_int_equal(check(&alice, ACCESS_PUBLISH, "dev/plc-01/telemetry/x"), -EACCES);
    assert_int_equal(check(&alice_unix, ACCESS_PUBLISH, "users/alice/x"), 0);
    assert_int_equal(check(&alice, ACCESS_SUBSCRIBE, "dev/+/commands"), 0);
    assert_int_equal(check(&alice, ACCESS_SUBSCRIBE, "dev/#"), 0);
    assert_int_equal(check(&alice, ACCESS_SUBSCRIBE, "users/+/x"), -EACCES);
    assert_int_equal(check(&alice, ACCESS_SUBSCRIBE, "#"), -EACCES);
    /* No rule selects bob: with rules present, that means nothing allowed. */
    assert_int_equal(check(&bob, ACCESS_PUBLISH, "users/bob/x"), -EACCES);
    /* %u with a name that is not one level never matches. */
    assert_int_equal(access_acl_check(&local, &slash, ACCESS_PUBLISH, "users/a/b/x", 11, NULL),
                     -EACCES);
    /* %u without an authenticated name never matches. */
    struct access_identity nobody = {0};
    assert_int_equal(access_acl_check(&local, &nobody, ACCESS_PUBLISH, "users//x", 8, NULL),
                     -EACCES);
}

static void test_acl_gid_glob_and_first_match(void **state)
{
    struct access_identity grp = {.has_cred = true, .uid = 2000, .gid = 100};
    struct access_identity root = {.has_cred = true, .uid = 0, .gid = 0};
    struct access_identity tcp = {0};

    /* Supplementary group selects too. */
    assert_int_equal(check(&grp, ACCESS_PUBLISH, "dev/plc-01/state"), -EACCES);
    grp.group_count = 2;
    grp.groups[0] = 27;
    grp.groups[1] = 500;
    assert_int_equal(check(&grp, ACCESS_PUBLISH, "dev/plc-01/state"), 0);
    assert_int_equal(check(&grp, ACCESS_PUBLISH, "dev/plc-1/state"), -EACCES);
    assert_int_equal(check(&grp, ACCESS_PUBLISH, "dev/plc-001/state"), -EACCES);
    assert_int_equal(check(&grp, ACCESS_SUBSCRIBE, "dev/plc-01/state"), -EACCES); /* none listed */
    /* uid 0 is governed by rule 3 unless an earlier one selects it. */
    assert_int_equal(check(&root, ACCESS_PUBLISH, "anything/at/all"), 0);
    assert_int_equal(check(&root, ACCESS_SUBSCRIBE, "#"), 0);
    /* §4.7.2: a leading wildcard does not cover '$' topics. */
    assert_int_equal(check(&root, ACCESS_PUBLISH, "$SYS/x"), -EACCES);
    /* A TCP client has no uid: uid and gid rules never select it. */
    assert_int_equal(check(&tcp, ACCESS_PUBLISH, "anything"), -EACCES);
    root.gid = 500; /* rule 2 now comes first for root */
    assert_int_equal(check(&root, ACCESS_PUBLISH, "anything/at/all"), -EACCES);
}

static void test_acl_any_child(void **state)
{
    static char *pub[] = {"dev/%c/telemetry"};
    static char *sub[] = {"dev/%c/commands"};
    struct conf_acl_rule rule = {
        .publish = pub, .publish_count = 1, .subscribe = sub, .subscribe_count = 1};
    struct conf_local local = {.acl = &rule, .acl_count = 1};
    struct access_identity anyone = {0};

    assert_int_equal(access_acl_check(&local, &anyone, ACCESS_PUBLISH, "dev/x/telemetry", 15, NULL),
                     0);
    /* Without children, %c is any child, like '+'. */
    assert_int_equal(
        access_acl_check(&local, &anyone, ACCESS_SUBSCRIBE, "dev/+/commands", 14, NULL), 0);
    assert_int_equal(access_acl_check(&local, &anyone, ACCESS_SUBSCRIBE, "dev/#", 5, NULL),
                     -EACCES);
}

/* Issue 12: cloud/<uplink>/... goes upstream raw; only a pattern naming
 * "cloud" as its first level grants it. */
static void test_acl_raw_passthrough_needs_explicit_grant(void **state)
{
    static char *wild[] = {"#", "+/c8y/#", "cl*/#", "%c/#"};
    static char *c8y[] = {"cloud/c8y/#", "#"};
    struct conf_acl_rule rule = {
        .publish = wild, .publish_count = 4, .subscribe = wild, .subscribe_count = 4};
    struct conf_local local = {.acl = &rule, .acl_count = 1};
    struct access_identity anyone = {0};
    struct conf_local none = {0};

#define ACL(act, topic) access_acl_check(&local, &anyone, act, topic, strlen(topic), NULL)
    assert_int_equal(ACL(ACCESS_PUBLISH, "cloud/c8y/s/us/victim"), -EACCES);
    assert_int_equal(ACL(ACCESS_PUBLISH, "cloud"), -EACCES);
    assert_int_equal(ACL(ACCESS_SUBSCRIBE, "cloud/c8y/s/ds"), -EACCES);
    assert_int_equal(ACL(ACCESS_SUBSCRIBE, "cloud/#"), -EACCES);
    /* Not raw: local topics, and "cloudy", are as before. */
    assert_int_equal(ACL(ACCESS_PUBLISH, "dev/x/telemetry"), 0);
    assert_int_equal(ACL(ACCESS_PUBLISH, "cloudy/x"), 0);
    assert_int_equal(ACL(ACCESS_PUBLISH, "x/cloud/c8y"), 0);
    /* A "+/..." filter is not mirrored upstream (only "cloud/..." is). */
    assert_int_equal(ACL(ACCESS_SUBSCRIBE, "+/c8y/s/ds"), 0);

    rule.publish = c8y;
    rule.publish_count = 2;
    rule.subscribe = c8y;
    rule.subscribe_count = 2;
    assert_int_equal(ACL(ACCESS_PUBLISH, "cloud/c8y/s/us/victim"), 0);
    assert_int_equal(ACL(ACCESS_PUBLISH, "cloud/gcp/x"), -EACCES);
    assert_int_equal(ACL(ACCESS_SUBSCRIBE, "cloud/c8y/s/ds"), 0);
    assert_int_equal(ACL(ACCESS_SUBSCRIBE, "cloud/+/s/ds"), -EACCES);
#undef ACL
    /* No rules at all: everything, raw pass-through included (documented). */
    assert_int_equal(
        access_acl_check(&none, &anyone, ACCESS_PUBLISH, "cloud/c8y/s/us/victim", 21, NULL), 0);
}

/* Issue 12 (Paho's test_subscribe_failure): "everything but this filter". */
static void test_acl_deny_entries(void **state)
{
    static char *deny_sub[] = {"test/nosubscribe", "dev/%c/secret", "users/%u/private/#", "$SYS/#"};
    static char *deny_pub[] = {"dev/+/config", "x/lock*"};
    static char *children[] = {"modbus-*"};
    struct conf_acl_rule two[] = {
        {.publish = all,
         .publish_count = 1,
         .subscribe = all,
         .subscribe_count = 1,
         .children = children,
         .children_count = 1,
         .deny_publish = deny_pub,
         .deny_publish_count = 2,
         .deny_subscribe = deny_sub,
         .deny_subscribe_count = 4},
        {.publish = all, .publish_count = 1}, /* never reached: rule 0 selects everyone */
    };
    struct conf_local local = {.acl = two, .acl_count = 2};
    struct access_identity alice = {.username = "alice"};
    int index = -1;

#define SUB(topic) access_acl_check(&local, &alice, ACCESS_SUBSCRIBE, topic, strlen(topic), NULL)
#define PUB(topic) access_acl_check(&local, &alice, ACCESS_PUBLISH, topic, strlen(topic), NULL)
    /* The exact filter, and every filter a deny pattern covers wholly. */
    assert_int_equal(
        access_acl_check(&local, &alice, ACCESS_SUBSCRIBE, "test/nosubscribe", 16, &index), -EPERM);
    assert_int_equal(index, 0);
    /* Filters that merely overlap a denied topic are granted (delivery
     * holds the denied topics back, below), the others as well. */
    assert_int_equal(SUB("#"), 0);
    assert_int_equal(SUB("test/#"), 0);
    assert_int_equal(SUB("test/+"), 0);
    assert_int_equal(SUB("+/nosubscribe"), 0);
    assert_int_equal(SUB("+/+"), 0);
    assert_int_equal(SUB("test/nosubscribe/x"), 0);
    assert_int_equal(SUB("test/other"), 0);
    assert_int_equal(SUB("test"), 0);
    assert_int_equal(SUB("test/nosubscribe2"), 0);
    /* "%c": only the rule's children; "%u": only the client's own name. */
    assert_int_equal(SUB("dev/modbus-1/secret"), -EPERM);
    assert_int_equal(SUB("dev/plc-1/secret"), 0);
    assert_int_equal(SUB("dev/+/secret"), 0);             /* overlaps modbus-*, not covered */
    assert_int_equal(SUB("users/alice/private"), -EPERM); /* "a/#" matches "a" */
    assert_int_equal(SUB("users/alice/private/x/y"), -EPERM);
    assert_int_equal(SUB("users/alice/private/#"), -EPERM);
    assert_int_equal(SUB("users/alice/private/+"), -EPERM);
    assert_int_equal(SUB("users/bob/private/x"), 0);
    assert_int_equal(SUB("users/+/private/x"), 0);
    assert_int_equal(SUB("$SYS/broker"), -EPERM);
    assert_int_equal(SUB("$SYS/#"), -EPERM);

    /* Delivery: a topic name any deny_subscribe pattern covers. */
#define HELD(topic) access_delivery_denied(&local, &alice, topic, strlen(topic))
    assert_true(HELD("test/nosubscribe"));
    assert_false(HELD("test/nosubscribe/x"));
    assert_false(HELD("test/other"));
    assert_true(HELD("dev/modbus-1/secret"));
    assert_false(HELD("dev/plc-1/secret"));
    assert_true(HELD("users/alice/private"));
    assert_true(HELD("users/alice/private/x"));
    assert_false(HELD("users/bob/private/x"));
    assert_true(HELD("$SYS/broker/uptime"));
    struct access_identity bob = {.username = "bob"};
    assert_false(access_delivery_denied(&local, &bob, "users/alice/private", 19));
    assert_true(access_delivery_denied(&local, &bob, "users/bob/private", 17));
    struct conf_local open_local = {0};
    assert_false(access_delivery_denied(&open_local, &alice, "test/nosubscribe", 16));

    /* Publish: a deny pattern covers the topic name. */
    assert_int_equal(PUB("dev/x/config"), -EPERM);
    assert_int_equal(PUB("dev/x/config/y"), 0);
    assert_int_equal(PUB("x/locked"), -EPERM);
    assert_int_equal(PUB("x/open"), 0);
    assert_int_equal(PUB("test/nosubscribe"), 0); /* deny_subscribe only */
    /* Deny applies whatever the allow-list says, and only in its own rule. */
    alice.has_cred = true;
    alice.uid = 5;
    two[0].has_uid = true;
    two[0].uid = 4;
    assert_int_equal(PUB("dev/x/config"), 0); /* rule 1 decides, it has no deny */
    assert_false(HELD("test/nosubscribe"));
#undef HELD
#undef SUB
#undef PUB
}

/* Issue 12: a uid rule plus a listener whose peers cannot be identified. */
static void test_acl_sidestep_warning(void **state)
{
    struct conf_acl_rule two[] = {
        {.has_uid = true, .uid = 1001, .publish = all, .publish_count = 1},
        {.publish = all, .publish_count = 1},
    };
    struct conf_listen any = {
        .kind = CONF_LISTEN_TCP, .url = "tcp://0.0.0.0:1883", .host = "0.0.0.0", .port = 1883};
    struct conf_listen any6 = {.kind = CONF_LISTEN_TCP, .url = "tcp://[::]:1883", .host = "::"};
    struct conf_listen lo = {
        .kind = CONF_LISTEN_TCP, .url = "tcp://127.0.0.1:1883", .host = "127.0.0.1"};
    struct conf_listen lo6 = {.kind = CONF_LISTEN_TCP, .url = "tcp://[::1]:1", .host = "::1"};
    struct conf_listen named = {
        .kind = CONF_LISTEN_TCP, .url = "tcp://localhost:1", .host = "localhost"};
    struct conf_listen sock = {.kind = CONF_LISTEN_UNIX, .url = "unix:///x", .path = "/x"};
    struct conf_local local = {.acl = two, .acl_count = 2};
    char buf[1024] = "";

    assert_true(access_acl_sidestep(&local, &any, buf, sizeof(buf)));
    assert_non_null(strstr(buf, "local.listen tcp://0.0.0.0:1883"));
    assert_non_null(strstr(buf, "side-step local.acl[0] (uid 1001)"));
    assert_non_null(strstr(buf, "gets local.acl[1]"));
    assert_non_null(strstr(buf, "bind the listener to 127.0.0.1"));
    assert_non_null(strstr(buf, "local.password_file"));
    assert_true(access_acl_sidestep(&local, &any6, buf, sizeof(buf)));
    assert_false(access_acl_sidestep(&local, &lo, buf, sizeof(buf)));
    assert_false(access_acl_sidestep(&local, &lo6, buf, sizeof(buf)));
    assert_false(access_acl_sidestep(&local, &named, buf, sizeof(buf)));
    assert_false(access_acl_sidestep(&local, &sock, buf, sizeof(buf)));
    /* TCP clients must log in: held to their user's rule. */
    local.password_file = "/etc/uplinkd/passwd";
    assert_false(access_acl_sidestep(&local, &any, buf, sizeof(buf)));
    local.password_file = NULL;
    /* No rule without selectors: an unidentified client gets nothing. */
    local.acl_count = 1;
    assert_false(access_acl_sidestep(&local, &any, buf, sizeof(buf)));
    /* No uid/gid rule: nothing to side-step. */
    local.acl = &two[1];
    assert_false(access_acl_sidestep(&local, &any, buf, sizeof(buf)));
    /* gid rules count too. */
    two[0].has_uid = false;
    two[0].has_gid = true;
    two[0].gid = 20;
    local.acl = two;
    local.acl_count = 2;
    assert_true(access_acl_sidestep(&local, &any, buf, sizeof(buf)));
    assert_non_null(strstr(buf, "local.acl[0] (gid 20)"));
}

static void test_pattern_checks(void **state)
{
    const char *reason = NULL;

    assert_int_equal(access_pattern_check("dev/%c/#", &reason), 0);
    assert_int_equal(access_pattern_check("users/%u", &reason), 0);
    assert_int_equal(access_pattern_check("dev/modbus-*/#", &reason), 0);
    assert_int_equal(access_pattern_check("dev/100%/x", &reason), 0);
    assert_int_equal(access_pattern_check("dev/x%c/#", &reason), -EINVAL);
    assert_non_null(strstr(reason, "whole topic level"));
    assert_int_equal(access_pattern_check("dev/#/x", &reason), -EINVAL);
    assert_int_equal(access_pattern_check("", &reason), -EINVAL);
    assert_int_equal(access_child_glob_check("modbus-*", &reason), 0);
    assert_int_equal(access_child_glob_check("a/b", &reason), -EINVAL);
    assert_int_equal(access_child_glob_check("+", &reason), -EINVAL);
    assert_int_equal(access_child_glob_check("", &reason), -EINVAL);
}

static void test_peer_identity(void **state)
{
    struct access_identity id = {0};
    char text[128];
    int sv[2];

    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sv), 0);
    assert_int_equal(access_peer_identity(sv[0], &id), 0);
    assert_true(id.has_cred);
    assert_int_equal(id.uid, getuid());
    assert_int_equal(id.gid, getgid());
    assert_int_equal(id.pid, getpid());
    access_identity_describe(&id, text, sizeof(text));
    assert_non_null(strstr(text, "uid "));
    close(sv[0]);
    close(sv[1]);
    assert_true(access_peer_identity(-1, &id) < 0);
    assert_false(id.has_cred);
    id.username = "u";
    access_identity_describe(&id, text, sizeof(text));
    assert_string_equal(text, "user u");
}

/* A connected loopback TCP pair: *@server is the accepted end. */
static void tcp_pair(int family, int *client, int *server)
{
    struct sockaddr_storage ss = {0};
    socklen_t len;
    int listener = socket(family, SOCK_STREAM, 0);

    assert_true(listener >= 0);
    if (family == AF_INET) {
        struct sockaddr_in *in = (struct sockaddr_in *)&ss;
        in->sin_family = AF_INET;
        in->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
        len = sizeof(*in);
    } else {
        struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
        in6->sin6_family = AF_INET6;
        in6->sin6_addr = in6addr_loopback;
        len = sizeof(*in6);
    }
    assert_int_equal(bind(listener, (struct sockaddr *)&ss, len), 0);
    assert_int_equal(listen(listener, 1), 0);
    assert_int_equal(getsockname(listener, (struct sockaddr *)&ss, &len), 0);
    *client = socket(family, SOCK_STREAM, 0);
    assert_true(*client >= 0);
    assert_int_equal(connect(*client, (struct sockaddr *)&ss, len), 0);
    *server = accept(listener, NULL, NULL);
    assert_true(*server >= 0);
    close(listener);
}

/* Look up the peer of the accepted @server the way local.c does. */
static int tcp_lookup(int server, bool groups, struct access_identity *id, char *why, size_t size)
{
    struct sockaddr_storage own, peer;
    socklen_t own_len = sizeof(own), peer_len = sizeof(peer);

    assert_int_equal(getsockname(server, (struct sockaddr *)&own, &own_len), 0);
    assert_int_equal(getpeername(server, (struct sockaddr *)&peer, &peer_len), 0);
    return access_tcp_peer_identity((struct sockaddr *)&own, (struct sockaddr *)&peer, groups, id,
                                    why, size);
}

/* Issue 12: a loopback TCP peer is identified by sock_diag and then held
 * to the uid/gid rules like a Unix socket peer; an unidentified one gets
 * only the rules that select no uid/gid. */
static void test_tcp_peer_identity(void **state)
{
    static char *own_topic[] = {"dev/own/#"};
    struct passwd *pw = getpwuid(getuid());
    struct access_identity id = {0}, unknown = {0};
    struct sockaddr_in far = {.sin_family = AF_INET, .sin_port = htons(1)}; /* never ephemeral */
    struct sockaddr_in near = {.sin_family = AF_INET, .sin_port = htons(2)};
    char why[160] = "", text[128];
    int client, server;

    tcp_pair(AF_INET, &client, &server);
    assert_int_equal(tcp_lookup(server, false, &id, why, sizeof(why)), 0);
    assert_true(id.has_cred);
    assert_true(id.tcp_peer);
    assert_int_equal(id.uid, getuid());
    assert_int_equal(id.pid, 0);
    assert_int_equal(id.gid, (gid_t)-1); /* not asked for */
    access_identity_describe(&id, text, sizeof(text));
    assert_non_null(strstr(text, "uid "));

    /* The gid path: the uid's passwd entry and its groups. */
    memset(&id, 0, sizeof(id));
    assert_int_equal(tcp_lookup(server, true, &id, why, sizeof(why)), 0);
    assert_non_null(pw);
    assert_int_equal(id.gid, pw->pw_gid);

    /* The same rules as for the Unix socket: the uid rule selects the
     * identified peer, the selector-less rule the unidentified one. */
    struct conf_acl_rule by_uid[] = {
        {.has_uid = true, .uid = getuid(), .publish = all, .publish_count = 1},
        {.publish = own_topic, .publish_count = 1},
    };
    struct conf_acl_rule by_gid[] = {
        {.has_gid = true, .gid = pw->pw_gid, .publish = all, .publish_count = 1},
        {.publish = own_topic, .publish_count = 1},
    };
    struct conf_local local = {.acl = by_uid, .acl_count = 2};
    int rule = -1;

    assert_int_equal(access_acl_check(&local, &id, ACCESS_PUBLISH, "a/b", 3, &rule), 0);
    assert_int_equal(rule, 0);
    assert_int_equal(access_acl_check(&local, &unknown, ACCESS_PUBLISH, "a/b", 3, &rule), -EACCES);
    assert_int_equal(rule, 1);
    assert_int_equal(access_acl_check(&local, &unknown, ACCESS_PUBLISH, "dev/own/x", 9, NULL), 0);
    local.acl = by_gid;
    assert_int_equal(access_acl_check(&local, &id, ACCESS_PUBLISH, "a/b", 3, &rule), 0);
    assert_int_equal(rule, 0);
    assert_true(access_acl_selects_gids(&local));
    assert_int_equal(access_acl_check(&local, &unknown, ACCESS_PUBLISH, "a/b", 3, &rule), -EACCES);
    assert_int_equal(rule, 1);

    /* A peer that is gone: the exact-match lookup finds no socket. */
    close(client);
    close(server);
    memset(&id, 0, sizeof(id));
    inet_pton(AF_INET, "127.0.0.1", &near.sin_addr);
    inet_pton(AF_INET, "127.0.0.1", &far.sin_addr);
    assert_true(access_tcp_peer_identity((struct sockaddr *)&near, (struct sockaddr *)&far, false,
                                         &id, why, sizeof(why)) < 0);
    assert_false(id.has_cred);
    assert_true(why[0] != '\0');

    /* Not on loopback: not even looked up, and the reason says so. */
    inet_pton(AF_INET, "192.0.2.7", &far.sin_addr);
    assert_true(access_tcp_peer_identity((struct sockaddr *)&near, (struct sockaddr *)&far, false,
                                         &id, why, sizeof(why)) < 0);
    assert_false(id.has_cred);
    assert_non_null(strstr(why, "192.0.2.7"));
    assert_non_null(strstr(why, "loopback"));

    /* IPv6 ::1, where the machine has it. */
    int fd6 = socket(AF_INET6, SOCK_STREAM, 0);
    struct sockaddr_in6 lo6 = {.sin6_family = AF_INET6, .sin6_addr = IN6ADDR_LOOPBACK_INIT};
    bool have6 = fd6 >= 0 && bind(fd6, (struct sockaddr *)&lo6, sizeof(lo6)) == 0;

    if (fd6 >= 0)
        close(fd6);
    if (have6) {
        tcp_pair(AF_INET6, &client, &server);
        memset(&id, 0, sizeof(id));
        assert_int_equal(tcp_lookup(server, false, &id, why, sizeof(why)), 0);
        assert_int_equal(id.uid, getuid());
        close(client);
        close(server);
    }
}

/* Who may resume a persistent session (local.c session_attach). */
static void test_identity_same(void **state)
{
    struct access_identity alice = {.has_cred = true, .uid = 0, .gid = 0, .username = "alice"};
    struct access_identity alice2 = {
        .has_cred = true, .uid = 0, .gid = 5, .pid = 9, .username = "alice"};
    struct access_identity bob = {.has_cred = true, .uid = 0, .username = "bob"};
    struct access_identity uid1001 = {.has_cred = true, .uid = 1001};
    struct access_identity uid1001b = {.has_cred = true, .uid = 1001, .gid = 7, .pid = 3};
    struct access_identity uid1002 = {.has_cred = true, .uid = 1002};
    struct access_identity nobody = {0}, nobody2 = {0};

    (void)state;
    assert_true(access_identity_same(&alice, &alice2)); /* gid and pid do not count */
    assert_false(access_identity_same(&alice, &bob));   /* same uid, other user */
    assert_false(access_identity_same(&alice, &uid1001));
    assert_true(access_identity_same(&uid1001, &uid1001b));
    assert_false(access_identity_same(&uid1001, &uid1002));
    assert_false(access_identity_same(&uid1001, &nobody));
    assert_true(access_identity_same(&nobody, &nobody2));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_identity_same),
        cmocka_unit_test(test_passwd_known_vector),
        cmocka_unit_test(test_passwd_refused),
        cmocka_unit_test(test_passwd_line_roundtrip),
        cmocka_unit_test(test_passwd_file_set),
        cmocka_unit_test(test_acl_no_rules),
        cmocka_unit_test(test_acl_child_rule),
        cmocka_unit_test(test_acl_user_rule),
        cmocka_unit_test(test_acl_gid_glob_and_first_match),
        cmocka_unit_test(test_acl_any_child),
        cmocka_unit_test(test_acl_raw_passthrough_needs_explicit_grant),
        cmocka_unit_test(test_acl_deny_entries),
        cmocka_unit_test(test_acl_sidestep_warning),
        cmocka_unit_test(test_pattern_checks),
        cmocka_unit_test(test_peer_identity),
        cmocka_unit_test(test_tcp_peer_identity),
    };

    return cmocka_run_group_tests(tests, NULL, NULL);
}
