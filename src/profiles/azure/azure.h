/* azure/azure.h - the pure rules of Azure IoT Hub's MQTT dialect, for the
 * profile and its unit tests (learn.microsoft.com, "Communicate with an IoT
 * hub using the MQTT protocol" and "Control access to IoT Hub by using
 * shared access signatures").
 *
 * A device connects with client id = its device id, user name
 * "<hub>/<device>/?api-version=<v>" and, for key authentication, a SAS token
 * as the password:
 *
 *   SharedAccessSignature sr=<enc(resource)>&sig=<enc(base64(HMAC-SHA256(
 *       key, enc(resource) + "\n" + expiry)))>&se=<expiry>[&skn=<policy>]
 *
 * where resource = "<hub>/devices/<device>", key = the base64-decoded
 * device (or policy) key, expiry = Unix seconds, and enc() the URL
 * encoding of RFC 3986 §2.1 (every byte but the unreserved ones).
 */
#ifndef UPLINKD_PROFILES_AZURE_H
#define UPLINKD_PROFILES_AZURE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <time.h>

#define AZURE_API_VERSION "2021-04-12"
/* IoT Hub device ids: up to 128 characters of letters, digits and
 * - . + % _ # * ? ! ( ) , : = @ $ ' */
#define AZURE_DEVICE_ID_MAX   128
#define AZURE_DEVICE_ID_EXTRA "-.+%_#*?!(),:=@$'"
/* Unacknowledged QoS 1 publishes per connection: the default max_inflight. */
#define AZURE_MAX_INFLIGHT 16
/* A device-to-cloud message: at most 256 KiB. */
#define AZURE_MAX_MESSAGE (256 * 1024)
/* The longest key this code takes (decoded; IoT Hub's are 32 or 64 bytes). */
#define AZURE_KEY_MAX 128
/* Room for a token: sr (hub + device, encoded 3x), sig, se, skn. */
#define AZURE_SAS_MAX 1400

/**
 * azure_device_id_check() - NULL when @id is a valid IoT Hub device id,
 * else a static reason.
 */
const char *azure_device_id_check(const char *id);

/**
 * azure_url_encode() - RFC 3986 §2.1 percent-encoding of @in (every byte
 * but A-Z a-z 0-9 - . _ ~, upper-case hex) into @out (@cap bytes).
 * Returns the length, or -ENAMETOOLONG.
 */
int azure_url_encode(const char *in, char *out, size_t cap);

/**
 * azure_key_decode() - the key in @text (base64, surrounding white space
 * ignored) into @key (AZURE_KEY_MAX bytes). Returns its length, or -EINVAL
 * (not base64, or empty or longer than AZURE_KEY_MAX).
 */
int azure_key_decode(const char *text, uint8_t key[AZURE_KEY_MAX]);

/**
 * azure_key_read() - the key in the file @path (azure_key_decode()) into
 * @key. Returns its length, or a negative errno with @why (@why_size
 * bytes) saying what is wrong with the file, in words for the log.
 */
int azure_key_read(const char *path, uint8_t key[AZURE_KEY_MAX], char *why, size_t why_size);

/**
 * azure_sas_token() - the SAS token for @hub/devices/@device, valid until
 * @expiry, signed with @key; @policy non-NULL adds skn=. Into @out (@cap
 * bytes). Returns the length, -ENAMETOOLONG, or -EIO (OpenSSL failed).
 */
int azure_sas_token(const uint8_t *key, size_t key_len, const char *hub, const char *device,
                    const char *policy, time_t expiry, char *out, size_t cap);

/* Computes HMAC-SHA256 of @data with the device key into @out; 32 or < 0. */
typedef int (*azure_mac_fn)(void *arg, const void *data, size_t len, uint8_t out[32]);

/**
 * azure_sas_token_mac() - azure_sas_token() with the signature computed by
 * @mac_fn(@arg, ...) (a key inside a PKCS#11 token) instead of from key
 * bytes. Returns as azure_sas_token().
 */
int azure_sas_token_mac(azure_mac_fn mac_fn, void *arg, const char *hub, const char *device,
                        const char *policy, time_t expiry, char *out, size_t cap);

/**
 * azure_derive_device_key() - a device key derived from a group enrolment
 * key (the Device Provisioning Service's symmetric-key group enrolment):
 * HMAC-SHA256(@group_key, @device) into @out (32 bytes). Returns 32 or -EIO.
 */
int azure_derive_device_key(const uint8_t *group_key, size_t group_len, const char *device,
                            uint8_t out[32]);

/**
 * azure_d2c_topic() - the device-to-cloud topic of @device:
 * devices/<device>/messages/events/ with the property bag: @json adds
 * $.ct=application/json and $.ce=utf-8 (so the hub's routing can read the
 * body), @sub (may be NULL; at most 255 bytes) the application property
 * subject=<sub>, all URL-encoded. Into @buf (@cap bytes). Returns the
 * length, or -ENAMETOOLONG.
 */
int azure_d2c_topic(const char *device, const char *sub, bool json, char *buf, size_t cap);

/**
 * azure_method_answer() - parse the state sub-topic "methods/<rid>/<status>"
 * of a direct method's answer: @rid (@cap bytes) and *@status (100-599).
 * A request id is 1-63 bytes without / + # & or blanks. Returns 0 or -EINVAL.
 */
int azure_method_answer(const char *sub, char *rid, size_t cap, int *status);

/**
 * azure_twin_response() - parse what follows $iothub/twin/res/:
 * "<status>/?$rid=<rid>[&$version=<n>]". Returns 0 or -EINVAL.
 */
int azure_twin_response(const char *rest, int *status, char *rid, size_t cap);

/**
 * azure_method_request() - parse what follows $iothub/methods/POST/:
 * "<name>/?$rid=<rid>"; the name (1-127 bytes) and the request id must be
 * usable as local topic levels. Returns 0 or -EINVAL.
 */
int azure_method_request(const char *rest, char *name, size_t name_cap, char *rid, size_t rid_cap);

#endif
