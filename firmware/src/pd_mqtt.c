#include "pd_mqtt.h"

#include <stdio.h>
#include <string.h>

#include "pd_codec.h"

static size_t fit(int n, size_t cap)
{
    return (n < 0 || (size_t)n >= cap) ? 0 : (size_t)n;
}

/* Strings we put into JSON or topics ourselves: refusing anything that
 * would need escaping is simpler and safer than escaping it. */
static int plain_text(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (c < 0x20 || c > 0x7E || c == '"' || c == '\\' || c == '+' || c == '#') return 0;
    }
    return 1;
}

size_t pd_mqtt_device_topic(const char *prefix, uint32_t device_id, const char *suffix, char *out,
                            size_t cap)
{
    if (!plain_text(prefix, PD_MAX_TOPIC_LEN) || !plain_text(suffix, PD_MAX_TOPIC_LEN)) return 0;
    return fit(snprintf(out, cap, "%s/devices/%lu/%s", prefix, (unsigned long)device_id, suffix),
               cap);
}

size_t pd_mqtt_activate_topic(const char *prefix, char *out, size_t cap)
{
    if (!plain_text(prefix, PD_MAX_TOPIC_LEN)) return 0;
    return fit(snprintf(out, cap, "%s/rpc/device/activate", prefix), cap);
}

size_t pd_mqtt_activation_request(const char *token, uint32_t capabilities,
                                  const uint8_t public_key[PD_KEY_LEN],
                                  const char *firmware_version, char *out, size_t cap)
{
    char pub[48];
    size_t n = strlen(token);
    if (n == 0 || n > PD_MAX_TOKEN_LEN) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = token[i];
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9'))) {
            return 0;
        }
    }
    if (firmware_version && !plain_text(firmware_version, 64)) return 0;
    pd_b64url_encode(public_key, PD_KEY_LEN, pub, sizeof pub);
    if (firmware_version) {
        return fit(snprintf(out, cap,
                            "{\"token\":\"%s\",\"capabilities\":%lu,\"public_key\":\"%s\","
                            "\"firmware_version\":\"%s\"}",
                            token, (unsigned long)capabilities, pub, firmware_version),
                   cap);
    }
    return fit(snprintf(out, cap, "{\"token\":\"%s\",\"capabilities\":%lu,\"public_key\":\"%s\"}",
                        token, (unsigned long)capabilities, pub),
               cap);
}

int pd_mqtt_parse_activation_reply(const char *json, size_t len, pd_activation_t *out)
{
    pd_json_span_t doc, body, v, keys, jwk;
    int64_t status, id;
    const char *pos = NULL;
    int r;
    memset(out, 0, sizeof *out);
    if (pd_json_parse(json, len, &doc) != 0 || pd_json_type(doc) != PD_JSON_OBJECT ||
        pd_json_get(doc, "status", &v) != 1 || pd_json_int(v, &status) != 0) {
        return -1;
    }
    out->status = (int)status;
    if (status != 200) return 0;
    if (pd_json_get(doc, "body", &body) != 1 || pd_json_type(body) != PD_JSON_OBJECT ||
        pd_json_get(body, "deviceId", &v) != 1 || pd_json_int(v, &id) != 0 || id <= 0 ||
        id > (int64_t)UINT32_MAX) {
        return -1;
    }
    out->device_id = (uint32_t)id;
    if (pd_json_get(body, "heartbeat_interval", &v) == 1) {
        pd_json_number(v, &out->heartbeat_interval);
    }
    if (pd_json_get(body, "gateway_id", &v) == 1) {
        pd_json_string(v, out->gateway_id, sizeof out->gateway_id, NULL);
    }
    if (pd_json_get(body, "grant_verification_keys", &keys) == 1 &&
        pd_json_type(keys) == PD_JSON_ARRAY) {
        /* The active key comes first; EdDSA keys are skipped, since this
         * library cannot verify them. */
        while ((r = pd_json_next_element(keys, &pos, &jwk)) == 1) {
            if (pd_key_from_jwk(&out->key, jwk.start, (size_t)(jwk.end - jwk.start)) == PD_OK) {
                out->has_key = 1;
                break;
            }
        }
    }
    return 0;
}

size_t pd_mqtt_heartbeat(double interval, uint64_t uptime, char *out, size_t cap)
{
    if (!(interval > 0 && interval < 1e9)) return 0;
    return fit(snprintf(out, cap, "{\"interval\":%.3f,\"uptime\":%llu}", interval,
                        (unsigned long long)uptime),
               cap);
}

int pd_mqtt_parse_command(const char *json, size_t len, char *id, size_t cap)
{
    pd_json_span_t doc, v;
    size_t n;
    if (pd_json_parse(json, len, &doc) != 0 || pd_json_type(doc) != PD_JSON_OBJECT ||
        pd_json_get(doc, "id", &v) != 1 || pd_json_string(v, id, cap, &n) != 0 ||
        !plain_text(id, PD_MAX_COMMAND_ID_LEN)) {
        return -1;
    }
    return 0;
}

size_t pd_mqtt_command_ack(const char *id, const char *result, char *out, size_t cap)
{
    if (!plain_text(id, PD_MAX_COMMAND_ID_LEN) || !plain_text(result, 32)) return 0;
    return fit(snprintf(out, cap, "{\"id\":\"%s\",\"result\":\"%s\"}", id, result), cap);
}

size_t pd_mqtt_wifi_status(const pd_report_t *report, char *out, size_t cap)
{
    if (!report->valid || !plain_text(report->grant_id, 23)) return 0;
    if (report->connected) {
        return fit(snprintf(out, cap, "{\"grant_id\":\"%s\",\"state\":\"connected\",\"reason\":null}",
                            report->grant_id),
                   cap);
    }
    return fit(snprintf(out, cap, "{\"grant_id\":\"%s\",\"state\":\"failed\",\"reason\":\"%s\"}",
                        report->grant_id, report->reason[0] ? report->reason : "unknown"),
               cap);
}
