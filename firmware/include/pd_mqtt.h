/* Payloads and topics of the device's MQTT side (DESIGN §4, README
 * "Provisioning"): activation, heartbeat, command ack and WiFi status. No
 * MQTT client inside: the firmware publishes these bytes with its own. */
#ifndef PD_MQTT_H
#define PD_MQTT_H

#include <stddef.h>
#include <stdint.h>

#include "pd_device.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PD_MAX_TOPIC_LEN 128
#define PD_MAX_TOKEN_LEN 32
#define PD_MAX_COMMAND_ID_LEN 64
#define PD_MAX_GATEWAY_ID_LEN 64
#define PD_ACTIVATION_REQUEST_LEN 192 /* with a 32-char firmware_version */
#define PD_HEARTBEAT_LEN 64
#define PD_ACK_LEN 112
#define PD_WIFI_STATUS_LEN 128

/* "<prefix>/devices/<id>/<suffix>", e.g. suffix "heartbeat", "status",
 * "commands/reconfigure", "commands/ack", "wifi/status", "replies/activate".
 * Returns the length, 0 if it does not fit. */
size_t pd_mqtt_device_topic(const char *prefix, uint32_t device_id, const char *suffix, char *out,
                            size_t cap);
/* "<prefix>/rpc/device/activate". */
size_t pd_mqtt_activate_topic(const char *prefix, char *out, size_t cap);

/* {"token","capabilities","public_key","firmware_version"?}. The token is
 * 32 characters [A-Za-z0-9]; firmware_version may be NULL and must be
 * printable ASCII without quotes or backslashes. */
size_t pd_mqtt_activation_request(const char *token, uint32_t capabilities,
                                  const uint8_t public_key[PD_KEY_LEN],
                                  const char *firmware_version, char *out, size_t cap);

typedef struct {
    int status; /* the reply's status; the rest is set only for 200 */
    uint32_t device_id;
    double heartbeat_interval;
    char gateway_id[PD_MAX_GATEWAY_ID_LEN + 1];
    pd_key_t key; /* the first grant-verification key this library can use */
    int has_key;
} pd_activation_t;

/* Parse the daemon's reply: 0 when it was read (check ->status), -1 if it
 * is not a reply at all. */
int pd_mqtt_parse_activation_reply(const char *json, size_t len, pd_activation_t *out);

/* {"interval":N,"uptime":N}: the interval lets the daemon time our absence. */
size_t pd_mqtt_heartbeat(double interval, uint64_t uptime, char *out, size_t cap);

/* A reconfigure command's id (a string); 0 or -1 if the payload is not a command. */
int pd_mqtt_parse_command(const char *json, size_t len, char *id, size_t cap);
/* {"id":…,"result":"<result>"}; result is a code like "ok". */
size_t pd_mqtt_command_ack(const char *id, const char *result, char *out, size_t cap);

/* {"grant_id","state","reason"} from the device's last report. */
size_t pd_mqtt_wifi_status(const pd_report_t *report, char *out, size_t cap);

#ifdef __cplusplus
}
#endif
#endif
