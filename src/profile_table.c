/* profile_table.c - the daemon halves of the profiles, one for each name of
 * the one list (PROFILE_LIST, src/profiles/meson.build). Apart from
 * profile.c so that the code the profiles call (profile.c) does not refer
 * back to the profiles: only whoever picks a profile for an uplink (the
 * router) links this table. */
#include <string.h>

#include "profile.h"

#define PROFILE_ENTRY(name) &profile_##name,
static const struct profile *const profiles[] = {PROFILE_LIST(PROFILE_ENTRY)};
#undef PROFILE_ENTRY

const struct profile *profile_find(const char *name)
{
    if (name == NULL)
        name = "generic";
    for (size_t i = 0; i < sizeof(profiles) / sizeof(profiles[0]); i++) {
        if (strcmp(profiles[i]->name, name) == 0)
            return profiles[i];
    }
    return NULL;
}
