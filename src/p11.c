/* p11.c - what uplinkd does with a PKCS#11 token directly (p11.h), through
 * p11-kit's module loading and URI parser: a key pair generated inside it
 * (CKM_EC_KEY_PAIR_GEN), a secret imported into it, and an HMAC computed by
 * it (CKM_SHA256_HMAC, PKCS#11 v2.40 §2.3.6 and §2.22). Private keys for TLS
 * and JWT go through the PKCS#11 engine instead (keys.c). */
#include "p11.h"

#include <errno.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <openssl/crypto.h>
#include <openssl/rand.h>
#include <p11-kit/p11-kit.h>
#include <p11-kit/uri.h>

/* DER of the OID of prime256v1 (1.2.840.10045.3.1.7): CKA_EC_PARAMS. */
static const unsigned char P256_OID[] = {0x06, 0x08, 0x2a, 0x86, 0x48,
                                         0xce, 0x3d, 0x03, 0x01, 0x07};

/* The first line of @path into @pin. Returns 0 or a negative errno. */
static int read_pin(const char *path, char *pin, size_t cap)
{
    FILE *f = fopen(path, "r");
    int rc = 0;

    if (!f)
        return -errno;
    if (!fgets(pin, (int)cap, f))
        rc = -EINVAL;
    fclose(f);
    if (rc == 0)
        pin[strcspn(pin, "\r\n")] = '\0';
    return rc;
}

/* The user PIN: @pin_file, else the URI's pin-value, else its
 * pin-source=file:PATH (RFC 7512 §2.4). "" when none is given. */
static int uri_pin(P11KitUri *uri, const char *pin_file, char *pin, size_t cap, char *err,
                   size_t err_size)
{
    const char *source = p11_kit_uri_get_pin_source(uri);
    const char *value = p11_kit_uri_get_pin_value(uri);
    int rc;

    pin[0] = '\0';
    if (!pin_file && source)
        pin_file = strncmp(source, "file:", 5) == 0 ? source + 5 : source;
    if (pin_file) {
        if ((rc = read_pin(pin_file, pin, cap)) < 0)
            snprintf(err, err_size, "cannot read the PIN from %s: %s", pin_file,
                     rc == -EINVAL ? "it is empty" : strerror(-rc));
        return rc;
    }
    if (value)
        snprintf(pin, cap, "%s", value);
    return 0;
}

/* The first slot of @modules whose token matches @uri. */
static bool find_token(CK_FUNCTION_LIST **modules, P11KitUri *uri, CK_FUNCTION_LIST **module,
                       CK_SLOT_ID *slot)
{
    for (size_t m = 0; modules[m]; m++) {
        CK_SLOT_ID slots[64];
        CK_ULONG count = 64;
        if (modules[m]->C_GetSlotList(CK_TRUE, slots, &count) != CKR_OK)
            continue;
        for (CK_ULONG i = 0; i < count; i++) {
            CK_TOKEN_INFO info;
            if (modules[m]->C_GetTokenInfo(slots[i], &info) == CKR_OK &&
                p11_kit_uri_match_token_info(uri, &info)) {
                *module = modules[m];
                *slot = slots[i];
                return true;
            }
        }
    }
    return false;
}

/* Does the session see an object of @klass with @label and/or @id? 1 (its
 * handle in *@out when not NULL), 0, or -EIO. */
static int find_object(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE s, CK_OBJECT_CLASS klass,
                       const CK_ATTRIBUTE *label, const CK_ATTRIBUTE *id, CK_OBJECT_HANDLE *out)
{
    CK_ATTRIBUTE match[3] = {{CKA_CLASS, &klass, sizeof(klass)}};
    CK_ULONG n = 1, found = 0;
    CK_OBJECT_HANDLE obj;

    if (label)
        match[n++] = *label;
    if (id)
        match[n++] = *id;
    if (f->C_FindObjectsInit(s, match, n) != CKR_OK)
        return -EIO;
    CK_RV rv = f->C_FindObjects(s, &obj, 1, &found);
    f->C_FindObjectsFinal(s);
    if (rv != CKR_OK)
        return -EIO;
    if (found && out)
        *out = obj;
    return found > 0;
}

/* C_GenerateKeyPair of an EC P-256 pair with @label and @id, stored in the
 * token: the private half sensitive and never extractable. */
static CK_RV generate(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE s, const CK_ATTRIBUTE *label,
                      const CK_ATTRIBUTE *id)
{
    CK_MECHANISM mech = {CKM_EC_KEY_PAIR_GEN, NULL, 0};
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    CK_ATTRIBUTE pub[] = {
        {CKA_EC_PARAMS, (void *)P256_OID, sizeof(P256_OID)},
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_VERIFY, &yes, sizeof(yes)},
        *label,
        *id,
    };
    CK_ATTRIBUTE priv[] = {
        {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},
        {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)},
        {CKA_SIGN, &yes, sizeof(yes)},
        *label,
        *id,
    };
    CK_OBJECT_HANDLE pub_h, priv_h;

    return f->C_GenerateKeyPair(s, &mech, pub, sizeof(pub) / sizeof(pub[0]), priv,
                                sizeof(priv) / sizeof(priv[0]), &pub_h, &priv_h);
}

struct p11 {
    CK_FUNCTION_LIST **modules; /* p11-kit's registered modules, or NULL */
    CK_FUNCTION_LIST *one;      /* the module asked for, or NULL */
    CK_FUNCTION_LIST *f;        /* the module holding the token */
    CK_SESSION_HANDLE session;
    bool session_open, logged_in;
    P11KitUri *uri;
    char module_file[4096];
};

void p11_close(struct p11 *p)
{
    if (!p)
        return;
    if (p->logged_in)
        p->f->C_Logout(p->session);
    if (p->session_open)
        p->f->C_CloseSession(p->session);
    if (p->one) {
        p11_kit_module_finalize(p->one);
        p11_kit_module_release(p->one);
    }
    if (p->modules)
        p11_kit_modules_finalize_and_release(p->modules);
    if (p->uri)
        p11_kit_uri_free(p->uri);
    free(p);
}

int p11_open(const char *uri_text, const char *module_path, const char *pin_file, struct p11 **out,
             char *err, size_t err_size)
{
    struct p11 *p = calloc(1, sizeof(*p));
    CK_FUNCTION_LIST *list[2] = {NULL, NULL};
    CK_SLOT_ID slot = 0;
    char pin[256];
    CK_RV rv;
    int rc;

    *out = NULL;
    if (!p || !(p->uri = p11_kit_uri_new())) {
        free(p);
        snprintf(err, err_size, "out of memory");
        return -ENOMEM;
    }
    if (p11_kit_uri_parse(uri_text, P11_KIT_URI_FOR_OBJECT_ON_TOKEN, p->uri) != P11_KIT_URI_OK ||
        (!p11_kit_uri_get_attribute(p->uri, CKA_LABEL) &&
         !p11_kit_uri_get_attribute(p->uri, CKA_ID))) {
        snprintf(err, err_size,
                 "%s is not a PKCS#11 URI naming an object in a token (expected e.g. "
                 "pkcs11:token=gw;object=device-key)",
                 strncmp(uri_text, "pkcs11:", 7) == 0 ? "the URI" : uri_text);
        rc = -EINVAL;
        goto err;
    }
    if ((rc = uri_pin(p->uri, pin_file, pin, sizeof(pin), err, err_size)) < 0)
        goto err;
    if (module_path) {
        p->one = p11_kit_module_load(module_path, 0);
        if (!p->one || p11_kit_module_initialize(p->one) != CKR_OK) {
            snprintf(err, err_size, "cannot load the PKCS#11 module %s", module_path);
            if (p->one)
                p11_kit_module_release(p->one);
            p->one = NULL;
            rc = -ENOENT;
            goto err;
        }
        list[0] = p->one;
    } else {
        p->modules = p11_kit_modules_load_and_initialize(0);
    }
    if (!find_token(p->one || !p->modules ? list : p->modules, p->uri, &p->f, &slot)) {
        snprintf(err, err_size,
                 "no token matches the URI (is it initialised, and is its module %s?)",
                 module_path ? module_path : "registered with p11-kit");
        rc = -ENOENT;
        goto err;
    }
    char *file = p11_kit_module_get_filename(p->f);
    if (file)
        snprintf(p->module_file, sizeof(p->module_file), "%s", file);
    free(file);
    rv = p->f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &p->session);
    if (rv != CKR_OK) {
        snprintf(err, err_size, "cannot open a session on the token: %s", p11_kit_strerror(rv));
        rc = -EIO;
        goto err;
    }
    p->session_open = true;
    rv = p->f->C_Login(p->session, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        snprintf(err, err_size,
                 "the token refused the user PIN (%s): give it with a PIN file or "
                 "pin-source=file:/PATH in the URI",
                 p11_kit_strerror(rv));
        rc = -EACCES;
        goto err;
    }
    p->logged_in = rv == CKR_OK;
    OPENSSL_cleanse(pin, sizeof(pin));
    *out = p;
    return 0;
err:
    OPENSSL_cleanse(pin, sizeof(pin));
    p11_close(p);
    return rc;
}

const char *p11_module_file(const struct p11 *p)
{
    return p->module_file;
}

int p11_ensure_ec_key(struct p11 *p, char *err, size_t err_size)
{
    CK_ATTRIBUTE *label = p11_kit_uri_get_attribute(p->uri, CKA_LABEL);
    CK_ATTRIBUTE *id = p11_kit_uri_get_attribute(p->uri, CKA_ID);
    unsigned char random_id[8];
    CK_ATTRIBUTE new_id = {CKA_ID, random_id, sizeof(random_id)};
    CK_ATTRIBUTE new_label = {CKA_LABEL, (void *)"uplinkd", 7};
    int rc = find_object(p->f, p->session, CKO_PRIVATE_KEY, label, id, NULL);

    if (rc < 0) {
        snprintf(err, err_size, "cannot search the token for the key");
        return rc;
    }
    if (rc > 0)
        return 0; /* there already: used as it is */
    if (!id) {
        if (RAND_bytes(random_id, sizeof(random_id)) != 1)
            return -EIO;
        id = &new_id;
    }
    CK_RV rv = generate(p->f, p->session, label ? label : &new_label, id);
    if (rv == CKR_MECHANISM_INVALID || rv == CKR_DOMAIN_PARAMS_INVALID) {
        snprintf(err, err_size, "the token cannot make EC P-256 keys (%s)", p11_kit_strerror(rv));
        return -ENOTSUP;
    }
    if (rv != CKR_OK) {
        snprintf(err, err_size, "the token could not make the key pair: %s", p11_kit_strerror(rv));
        return -EIO;
    }
    return 1;
}

int p11_import_secret(struct p11 *p, const uint8_t *key, size_t len, char *err, size_t err_size)
{
    CK_ATTRIBUTE *label = p11_kit_uri_get_attribute(p->uri, CKA_LABEL);
    CK_ATTRIBUTE *id = p11_kit_uri_get_attribute(p->uri, CKA_ID);
    CK_OBJECT_CLASS klass = CKO_SECRET_KEY;
    CK_KEY_TYPE type = CKK_GENERIC_SECRET;
    CK_BBOOL yes = CK_TRUE, no = CK_FALSE;
    unsigned char random_id[8];
    CK_ATTRIBUTE new_id = {CKA_ID, random_id, sizeof(random_id)};
    CK_ATTRIBUTE new_label = {CKA_LABEL, (void *)"uplinkd", 7};
    CK_OBJECT_HANDLE obj;
    int rc = find_object(p->f, p->session, CKO_SECRET_KEY, label, id, NULL);

    if (rc != 0) {
        snprintf(err, err_size,
                 rc > 0 ? "the token already holds a secret key with this "
                          "label/id; delete it first or name another object"
                        : "cannot search the token for the key");
        return rc > 0 ? -EEXIST : rc;
    }
    if (!id) {
        if (RAND_bytes(random_id, sizeof(random_id)) != 1)
            return -EIO;
        id = &new_id;
    }
    CK_ATTRIBUTE attrs[] = {
        {CKA_CLASS, &klass, sizeof(klass)}, {CKA_KEY_TYPE, &type, sizeof(type)},
        {CKA_VALUE, (void *)key, len},      {CKA_TOKEN, &yes, sizeof(yes)},
        {CKA_PRIVATE, &yes, sizeof(yes)},   {CKA_SENSITIVE, &yes, sizeof(yes)},
        {CKA_EXTRACTABLE, &no, sizeof(no)}, {CKA_SIGN, &yes, sizeof(yes)},
        label ? *label : new_label,         *id,
    };
    CK_RV rv = p->f->C_CreateObject(p->session, attrs, sizeof(attrs) / sizeof(attrs[0]), &obj);
    if (rv != CKR_OK) {
        snprintf(err, err_size, "the token did not take the secret key: %s", p11_kit_strerror(rv));
        return -EIO;
    }
    return 0;
}

int p11_hmac_sha256(struct p11 *p, const void *data, size_t len, uint8_t out[32], char *err,
                    size_t err_size)
{
    CK_ATTRIBUTE *label = p11_kit_uri_get_attribute(p->uri, CKA_LABEL);
    CK_ATTRIBUTE *id = p11_kit_uri_get_attribute(p->uri, CKA_ID);
    CK_MECHANISM mech = {CKM_SHA256_HMAC, NULL, 0};
    CK_OBJECT_HANDLE key;
    CK_ULONG out_len = 32;
    int rc = find_object(p->f, p->session, CKO_SECRET_KEY, label, id, &key);
    CK_RV rv;

    if (rc <= 0) {
        snprintf(err, err_size,
                 rc == 0 ? "the token holds no secret key with this label/id (import the "
                           "device key: uplinkctl secret import)"
                         : "cannot search the token for the key");
        return rc == 0 ? -ENOKEY : rc;
    }
    rv = p->f->C_SignInit(p->session, &mech, key);
    if (rv == CKR_OK)
        rv = p->f->C_Sign(p->session, (CK_BYTE *)data, len, out, &out_len);
    if (rv != CKR_OK || out_len != 32) {
        snprintf(err, err_size, "the token could not compute HMAC-SHA256 with the key: %s",
                 p11_kit_strerror(rv));
        return -EIO;
    }
    return 32;
}
