/* profile_spec.c - the list of profile descriptors (see profile_spec.h). */
#include "profile_spec.h"

#include <errno.h>
#include <string.h>

#include "conf.h"

#define PROFILE_SPEC_ENTRY(name) &profile_spec_##name,
static const struct profile_spec *const specs[] = {PROFILE_LIST(PROFILE_SPEC_ENTRY)};
#undef PROFILE_SPEC_ENTRY

#define PROFILE_SPEC_NAME(name) #name,
static const char *const names[] = {PROFILE_LIST(PROFILE_SPEC_NAME) NULL};
#undef PROFILE_SPEC_NAME

const struct profile_spec *profile_spec_find(const char *name)
{
    if (name == NULL)
        name = "generic";
    for (size_t i = 0; i < sizeof(specs) / sizeof(specs[0]); i++)
        if (strcmp(specs[i]->name, name) == 0)
            return specs[i];
    return NULL;
}

const struct profile_spec *const *profile_specs(void)
{
    return specs;
}

const char *const *profile_spec_names(void)
{
    return names;
}

void profile_connect_id(const struct conf_uplink *uc, struct profile_connect_id *out)
{
    /* A conf built by hand (tests) may name the profile only. */
    const struct profile_spec *spec = uc->spec ? uc->spec : profile_spec_find(uc->profile);

    memset(out, 0, sizeof(*out));
    if (spec && spec->connect_id)
        spec->connect_id(uc, out);
}

int profile_child_key_path(const char *pattern, const char *child, char *buf, size_t cap)
{
    size_t used = 0;

    for (const char *p = pattern; *p; p++) {
        const char *text = p;
        size_t len = 1;
        if (p[0] == '%' && p[1] == 'c') {
            text = child;
            len = strlen(child);
            p++;
        } else if (p[0] == '%' && p[1] == '%') {
            p++;
        }
        if (used + len >= cap)
            return -ENAMETOOLONG;
        memcpy(buf + used, text, len);
        used += len;
    }
    if (cap == 0)
        return -ENAMETOOLONG;
    buf[used] = '\0';
    return (int)used;
}
