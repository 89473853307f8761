/* uplinkctl_p11.c - an EC P-256 key pair generated inside a PKCS#11 token
 * (uplinkctl_p11.h), through p11-kit's module loading and URI parser and
 * the token's own C_GenerateKeyPair (PKCS#11 v2.40 §2.3.6, CKM_EC_KEY_PAIR_GEN). */
#include "uplinkctl_p11.h"

#include <errno.h>
#include <stdbool.h>
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

/* Does the session see a private key with @label and/or @id? */
static int have_key(CK_FUNCTION_LIST *f, CK_SESSION_HANDLE s, CK_ATTRIBUTE *label, CK_ATTRIBUTE *id)
{
    CK_OBJECT_CLASS klass = CKO_PRIVATE_KEY;
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
    return rv != CKR_OK ? -EIO : found > 0;
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

/* Log in, find or make the key. */
static int ensure_in_slot(CK_FUNCTION_LIST *f, CK_SLOT_ID slot, P11KitUri *uri, const char *pin,
                          char *err, size_t err_size)
{
    CK_ATTRIBUTE *label = p11_kit_uri_get_attribute(uri, CKA_LABEL);
    CK_ATTRIBUTE *id = p11_kit_uri_get_attribute(uri, CKA_ID);
    unsigned char random_id[8];
    CK_ATTRIBUTE new_id = {CKA_ID, random_id, sizeof(random_id)};
    CK_ATTRIBUTE new_label = {CKA_LABEL, (void *)"uplinkd", 7};
    CK_SESSION_HANDLE s;
    CK_RV rv;
    int rc;

    rv = f->C_OpenSession(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION, NULL, NULL, &s);
    if (rv != CKR_OK) {
        snprintf(err, err_size, "cannot open a read-write session on the token: %s",
                 p11_kit_strerror(rv));
        return -EIO;
    }
    rv = f->C_Login(s, CKU_USER, (CK_UTF8CHAR *)pin, strlen(pin));
    if (rv != CKR_OK && rv != CKR_USER_ALREADY_LOGGED_IN) {
        snprintf(err, err_size,
                 "the token refused the user PIN (%s): give it with --pin-file FILE or "
                 "pin-source=file:/PATH in the URI",
                 p11_kit_strerror(rv));
        f->C_CloseSession(s);
        return -EACCES;
    }
    rc = have_key(f, s, label, id);
    if (rc == 0) {
        if (!id) {
            if (RAND_bytes(random_id, sizeof(random_id)) != 1) {
                rc = -EIO;
                goto out;
            }
            id = &new_id;
        }
        rv = generate(f, s, label ? label : &new_label, id);
        if (rv == CKR_MECHANISM_INVALID || rv == CKR_DOMAIN_PARAMS_INVALID) {
            snprintf(err, err_size, "the token cannot make EC P-256 keys (%s)",
                     p11_kit_strerror(rv));
            rc = -ENOTSUP;
        } else if (rv != CKR_OK) {
            snprintf(err, err_size, "the token could not make the key pair: %s",
                     p11_kit_strerror(rv));
            rc = -EIO;
        } else {
            rc = 1;
        }
    } else if (rc < 0) {
        snprintf(err, err_size, "cannot search the token for the key");
    } else {
        rc = 0; /* there already */
    }
out:
    f->C_Logout(s);
    f->C_CloseSession(s);
    return rc;
}

int p11_ensure_ec_key(const char *uri_text, const char *module_path, const char *pin_file,
                      char *found, size_t found_size, char *err, size_t err_size)
{
    P11KitUri *uri = p11_kit_uri_new();
    CK_FUNCTION_LIST **modules = NULL, *one = NULL, *module = NULL;
    CK_FUNCTION_LIST *list[2] = {NULL, NULL};
    CK_SLOT_ID slot = 0;
    char pin[256];
    int rc;

    found[0] = '\0';
    if (!uri)
        return -ENOMEM;
    if (p11_kit_uri_parse(uri_text, P11_KIT_URI_FOR_OBJECT_ON_TOKEN, uri) != P11_KIT_URI_OK ||
        (!p11_kit_uri_get_attribute(uri, CKA_LABEL) && !p11_kit_uri_get_attribute(uri, CKA_ID))) {
        snprintf(err, err_size,
                 "%s is not a PKCS#11 URI naming a key in a token (expected e.g. "
                 "pkcs11:token=gw;object=device-key)",
                 strncmp(uri_text, "pkcs11:", 7) == 0 ? "the URI" : uri_text);
        p11_kit_uri_free(uri);
        return -EINVAL;
    }
    if ((rc = uri_pin(uri, pin_file, pin, sizeof(pin), err, err_size)) < 0)
        goto out;
    if (module_path) {
        one = p11_kit_module_load(module_path, 0);
        if (!one || p11_kit_module_initialize(one) != CKR_OK) {
            snprintf(err, err_size, "cannot load the PKCS#11 module %s", module_path);
            if (one)
                p11_kit_module_release(one);
            one = NULL;
            rc = -ENOENT;
            goto out;
        }
        list[0] = one;
    } else {
        modules = p11_kit_modules_load_and_initialize(0);
    }
    if (!find_token(one ? list : modules ? modules : list, uri, &module, &slot)) {
        snprintf(err, err_size,
                 "no token matches the URI (is it initialised, and is its module %s?)",
                 module_path ? module_path : "registered with p11-kit");
        rc = -ENOENT;
        goto out;
    }
    rc = ensure_in_slot(module, slot, uri, pin, err, err_size);
    char *file = p11_kit_module_get_filename(module);
    if (file)
        snprintf(found, found_size, "%s", file);
    free(file);
out:
    OPENSSL_cleanse(pin, sizeof(pin));
    if (one) {
        p11_kit_module_finalize(one);
        p11_kit_module_release(one);
    }
    if (modules)
        p11_kit_modules_finalize_and_release(modules);
    p11_kit_uri_free(uri);
    return rc;
}
