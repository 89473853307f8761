/* aws/fleet.c - fleet provisioning's messages (aws.h), pure: reading the
 * JSON answers of CreateKeysAndCertificate and RegisterThing, and writing
 * the RegisterThing request. The exchange itself is provision.c. */
#include "aws.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include <yaml.h>

#include "json.h"
#include "profiles/aws/section.h"

int aws_json_strings(const void *payload, size_t len, const char *const *names, char **values,
                     size_t n)
{
    yaml_parser_t parser;
    yaml_document_t doc;
    int rc = 0;

    for (size_t i = 0; i < n; i++)
        values[i] = NULL;
    if (!yaml_parser_initialize(&parser))
        return -ENOMEM;
    yaml_parser_set_input_string(&parser, payload, len);
    if (!yaml_parser_load(&parser, &doc)) {
        yaml_parser_delete(&parser);
        return -EINVAL;
    }
    yaml_node_t *root = yaml_document_get_root_node(&doc);
    if (root == NULL || root->type != YAML_MAPPING_NODE ||
        root->data.mapping.style != YAML_FLOW_MAPPING_STYLE) {
        rc = -EINVAL;
        goto out;
    }
    for (yaml_node_pair_t *pair = root->data.mapping.pairs.start;
         pair < root->data.mapping.pairs.top; pair++) {
        yaml_node_t *key = yaml_document_get_node(&doc, pair->key);
        yaml_node_t *value = yaml_document_get_node(&doc, pair->value);
        if (!key || key->type != YAML_SCALAR_NODE || !value || value->type != YAML_SCALAR_NODE ||
            value->data.scalar.style != YAML_DOUBLE_QUOTED_SCALAR_STYLE)
            continue; /* JSON strings are double-quoted; numbers and objects are not wanted */
        for (size_t i = 0; i < n; i++) {
            if (values[i] || strcmp((const char *)key->data.scalar.value, names[i]) != 0)
                continue;
            values[i] = strndup((const char *)value->data.scalar.value, value->data.scalar.length);
            if (!values[i])
                rc = -ENOMEM;
        }
    }
out:
    yaml_document_delete(&doc);
    yaml_parser_delete(&parser);
    if (rc < 0) {
        for (size_t i = 0; i < n; i++) {
            free(values[i]);
            values[i] = NULL;
        }
    }
    return rc;
}

void aws_provision_request(const char *token, const struct conf_aws_param *params, size_t count,
                           struct json_buf *out)
{
    json_append_raw(out, "{\"certificateOwnershipToken\":");
    json_append_string(out, token);
    json_append_raw(out, ",\"parameters\":{");
    for (size_t i = 0; i < count; i++) {
        json_append_raw(out, i ? "," : "");
        json_append_string(out, params[i].name);
        json_append_raw(out, ":");
        json_append_string(out, params[i].value);
    }
    json_append_raw(out, "}}");
}
