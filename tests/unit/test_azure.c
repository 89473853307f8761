/* test_azure.c - the pure rules of profile azure (src/profiles/azure/sas.c):
 * URL encoding, device keys, SAS tokens and group-key derivation against
 * vectors computed with Python's hmac, base64 and urllib.parse.quote (an
 * implementation independent of this one), device ids and the
 * device-to-cloud topic with its property bag; and the section's defaults
 * (conf_load() of a small file). */
#include <errno.h>
#include <limits.h>
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <cmocka.h>
#include <openssl/evp.h>

#include "conf.h"
#include "profiles/azure/azure.h"
#include "profiles/azure/section.h"

/* "0123456789abcdef0123456789abcdef" in base64, as the portal shows a key. */
#define KEY_B64 "MDEyMzQ1Njc4OWFiY2RlZjAxMjM0NTY3ODlhYmNkZWY="

static void test_url_encode(void **state)
{
    char out[128];

    (void)state;
    assert_int_equal(azure_url_encode("hub.azure-devices.net/devices/d 1", out, sizeof(out)), 39);
    assert_string_equal(out, "hub.azure-devices.net%2Fdevices%2Fd%201");
    assert_int_equal(azure_url_encode("a+b=c&~_", out, sizeof(out)), 14);
    assert_string_equal(out, "a%2Bb%3Dc%26~_");
    assert_int_equal(azure_url_encode("\xc3\xbc", out, sizeof(out)), 6);
    assert_string_equal(out, "%C3%BC");
    assert_int_equal(azure_url_encode("abc", out, 3), -ENAMETOOLONG);
    assert_int_equal(azure_url_encode("abc", out, 4), 3);
}

static void test_key_decode(void **state)
{
    uint8_t key[AZURE_KEY_MAX];

    (void)state;
    assert_int_equal(azure_key_decode(KEY_B64, key), 32);
    assert_memory_equal(key, "0123456789abcdef0123456789abcdef", 32);
    assert_int_equal(azure_key_decode("  " KEY_B64 "\n", key), 32); /* a file's newline */
    assert_int_equal(azure_key_decode("AAECAw==", key), 4);
    assert_int_equal(azure_key_decode("AAECAw=", key), -EINVAL);  /* length not a multiple of 4 */
    assert_int_equal(azure_key_decode("AA=CAw==", key), -EINVAL); /* data after padding */
    assert_int_equal(azure_key_decode("AAEC-w==", key), -EINVAL); /* base64url is not the format */
    assert_int_equal(azure_key_decode("", key), -EINVAL);
    assert_int_equal(azure_key_decode("AAEC Aw==", key), -EINVAL); /* two words */
}

static void test_sas_token(void **state)
{
    uint8_t key[AZURE_KEY_MAX];
    char token[AZURE_SAS_MAX];
    int len;

    (void)state;
    len = azure_key_decode(KEY_B64, key);
    assert_int_equal(len, 32);
    assert_true(azure_sas_token(key, (size_t)len, "myhub.azure-devices.net", "dev-1", NULL,
                                1700000000, token, sizeof(token)) > 0);
    assert_string_equal(token,
                        "SharedAccessSignature sr=myhub.azure-devices.net%2Fdevices%2Fdev-1"
                        "&sig=l7%2Fu96NiMH3c2q8ND0vSv7AgtbSZO7bj2kWfUIF7ugw%3D&se=1700000000");
    /* A policy key adds skn=; the signature is the same (it covers sr and se only). */
    assert_true(azure_sas_token(key, (size_t)len, "myhub.azure-devices.net", "dev-1",
                                "device policy", 1700000000, token, sizeof(token)) > 0);
    assert_non_null(strstr(token, "&sig=l7%2Fu96NiMH3c2q8ND0vSv7AgtbSZO7bj2kWfUIF7ugw%3D&se="
                                  "1700000000&skn=device%20policy"));
    /* Another expiry, another signature. */
    assert_true(azure_sas_token(key, (size_t)len, "myhub.azure-devices.net", "dev-1", NULL,
                                1700000001, token, sizeof(token)) > 0);
    assert_null(strstr(token, "l7%2Fu96NiMH3c2q8ND0vSv7AgtbSZO7bj2kWfUIF7ugw"));
    assert_int_equal(azure_sas_token(key, (size_t)len, "myhub.azure-devices.net", "dev-1", NULL,
                                     1700000000, token, 40),
                     -ENAMETOOLONG);
}

static void test_derive_device_key(void **state)
{
    uint8_t group[AZURE_KEY_MAX], derived[32];
    unsigned char b64[64];
    int len;

    (void)state;
    len = azure_key_decode(KEY_B64, group);
    assert_int_equal(azure_derive_device_key(group, (size_t)len, "child-7", derived), 32);
    EVP_EncodeBlock(b64, derived, 32);
    assert_string_equal((char *)b64, "q4AHpVeuzUnjgqIx57ukOqrGR9KGYouWETVq2pUKKi4=");
}

static void test_device_id(void **state)
{
    char long_id[AZURE_DEVICE_ID_MAX + 2];

    (void)state;
    assert_null(azure_device_id_check("gw-01.site:a@b"));
    assert_null(azure_device_id_check("x(1)=$'!,*?%#_+"));
    assert_non_null(azure_device_id_check(""));
    assert_non_null(azure_device_id_check("has space"));
    assert_non_null(azure_device_id_check("slash/no"));
    memset(long_id, 'a', sizeof(long_id) - 1);
    long_id[sizeof(long_id) - 1] = '\0';
    assert_non_null(azure_device_id_check(long_id));
    long_id[AZURE_DEVICE_ID_MAX] = '\0';
    assert_null(azure_device_id_check(long_id));
}

static void test_d2c_topic(void **state)
{
    char topic[256];

    (void)state;
    assert_int_equal(azure_d2c_topic("gw", NULL, false, topic, sizeof(topic)), 27);
    assert_string_equal(topic, "devices/gw/messages/events/");
    assert_true(azure_d2c_topic("gw", NULL, true, topic, sizeof(topic)) > 0);
    assert_string_equal(topic, "devices/gw/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8");
    assert_true(azure_d2c_topic("gw", "line 2/temp", true, topic, sizeof(topic)) > 0);
    assert_string_equal(topic, "devices/gw/messages/events/%24.ct=application%2Fjson&%24.ce=utf-8"
                               "&subject=line%202%2Ftemp");
    assert_true(azure_d2c_topic("gw", "t", false, topic, sizeof(topic)) > 0);
    assert_string_equal(topic, "devices/gw/messages/events/subject=t");
    assert_int_equal(azure_d2c_topic("gw", "t", true, topic, 40), -ENAMETOOLONG);
}

static void test_twin_and_method_topics(void **state)
{
    char rid[64], name[128];
    int status = 0;

    (void)state;
    assert_int_equal(azure_method_answer("methods/7/200", rid, sizeof(rid), &status), 0);
    assert_string_equal(rid, "7");
    assert_int_equal(status, 200);
    assert_int_equal(azure_method_answer("methods/abc-1/404", rid, sizeof(rid), &status), 0);
    assert_int_equal(status, 404);
    assert_int_equal(azure_method_answer("methods/7/20", rid, sizeof(rid), &status), -EINVAL);
    assert_int_equal(azure_method_answer("methods/7/600", rid, sizeof(rid), &status), -EINVAL);
    assert_int_equal(azure_method_answer("methods//200", rid, sizeof(rid), &status), -EINVAL);
    assert_int_equal(azure_method_answer("methods/a&b/200", rid, sizeof(rid), &status), -EINVAL);
    assert_int_equal(azure_method_answer("other/7/200", rid, sizeof(rid), &status), -EINVAL);
    assert_int_equal(azure_method_answer("methods/7", rid, sizeof(rid), &status), -EINVAL);

    assert_int_equal(azure_twin_response("200/?$rid=g12", &status, rid, sizeof(rid)), 0);
    assert_int_equal(status, 200);
    assert_string_equal(rid, "g12");
    assert_int_equal(azure_twin_response("204/?$rid=p3&$version=5", &status, rid, sizeof(rid)), 0);
    assert_int_equal(status, 204);
    assert_string_equal(rid, "p3");
    assert_int_equal(azure_twin_response("200?$rid=1", &status, rid, sizeof(rid)), -EINVAL);
    assert_int_equal(azure_twin_response("200/?rid=1", &status, rid, sizeof(rid)), -EINVAL);

    assert_int_equal(azure_method_request("reboot/?$rid=9", name, sizeof(name), rid, sizeof(rid)),
                     0);
    assert_string_equal(name, "reboot");
    assert_string_equal(rid, "9");
    assert_int_equal(azure_method_request("re+boot/?$rid=9", name, sizeof(name), rid, sizeof(rid)),
                     -EINVAL);
    assert_int_equal(azure_method_request("reboot/?$rid=", name, sizeof(name), rid, sizeof(rid)),
                     -EINVAL);
}

/* conf_load() of an azure uplink with @extra lines (uplink level) in a
 * fresh directory holding the key file; NULL with *@errors on failure. */
static struct conf *load_azure(const char *extra, char **errors, char *dir, size_t dir_size)
{
    char path[PATH_MAX];
    struct conf *conf = NULL;
    FILE *f;

    snprintf(dir, dir_size, "/tmp/test_azure.XXXXXX");
    assert_non_null(mkdtemp(dir));
    snprintf(path, sizeof(path), "%s/dev.key", dir);
    assert_non_null(f = fopen(path, "w"));
    fputs(KEY_B64 "\n", f);
    fclose(f);
    snprintf(path, sizeof(path), "%s/uplinkd.yaml", dir);
    assert_non_null(f = fopen(path, "w"));
    fprintf(f,
            "gateway:\n  id: gw-1\n  state_dir: %s/state\n"
            "uplinks:\n  - name: hub\n    profile: azure\n"
            "    host: h.azure-devices.net\n    azure:\n      key_file: dev.key\n%s",
            dir, extra);
    fclose(f);
    *errors = NULL;
    if (conf_load(path, &conf, errors) != 0)
        return NULL;
    return conf;
}

static void remove_azure_dir(const char *dir)
{
    char path[PATH_MAX];

    snprintf(path, sizeof(path), "%s/dev.key", dir);
    unlink(path);
    snprintf(path, sizeof(path), "%s/uplinkd.yaml", dir);
    unlink(path);
    rmdir(dir);
}

/* max_inflight defaults to IoT Hub's 16 (a set value is kept); children's
 * keys: a file pattern or a group key, idle close after 10 minutes. */
static void test_section_defaults(void **state)
{
    char dir[64], *errors = NULL;
    struct conf *conf;

    (void)state;
    conf = load_azure("", &errors, dir, sizeof(dir));
    if (!conf)
        fail_msg("%s", errors);
    assert_int_equal(conf->uplinks[0].max_inflight, AZURE_MAX_INFLIGHT);
    assert_null(azure_conf(&conf->uplinks[0])->child_key);
    assert_null(azure_conf(&conf->uplinks[0])->group_key_file);
    conf_free(conf);
    remove_azure_dir(dir);

    conf = load_azure("      child_key: /etc/uplinkd/azure/%c.key\n      session_idle: 30s\n"
                      "    max_inflight: 40\n",
                      &errors, dir, sizeof(dir));
    if (!conf)
        fail_msg("%s", errors);
    assert_int_equal(conf->uplinks[0].max_inflight, 40);
    assert_string_equal(azure_conf(&conf->uplinks[0])->child_key, "/etc/uplinkd/azure/%c.key");
    assert_int_equal(azure_conf(&conf->uplinks[0])->session_idle_ms, 30000);
    assert_false(azure_conf(&conf->uplinks[0])->child);
    conf_free(conf);
    remove_azure_dir(dir);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_url_encode),
        cmocka_unit_test(test_key_decode),
        cmocka_unit_test(test_sas_token),
        cmocka_unit_test(test_derive_device_key),
        cmocka_unit_test(test_device_id),
        cmocka_unit_test(test_d2c_topic),
        cmocka_unit_test(test_twin_and_method_topics),
        cmocka_unit_test(test_section_defaults),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
