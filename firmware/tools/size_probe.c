/* Calls every public entry point once, so a --gc-sections static link of
 * this program holds exactly the library and the mbedTLS code it needs:
 * `size` of it minus `size` of size_baseline.c is the firmware cost. Not
 * meant to run. */
#include <string.h>

#include "pd_device.h"
#include "pd_gatt.h"
#include "pd_mqtt.h"

static int64_t now(void *ctx)
{
    (void)ctx;
    return 0;
}

static int rnd(void *ctx, uint8_t *buf, size_t len)
{
    (void)ctx;
    memset(buf, 1, len);
    return 0;
}

int main(int argc, char **argv)
{
    static pd_device_t dev;
    static pd_gatt_t gatt;
    static pd_key_t key;
    static pd_config_t cfg;
    static pd_wifi_credentials_t creds;
    static pd_gatt_result_t res;
    static pd_activation_t act;
    static char text[512];
    static uint8_t out[512];
    size_t n = 0;
    const char *in = argc > 1 ? argv[1] : "";
    cfg.now = now;
    cfg.random = rnd;
    n += (size_t)pd_key_from_jwk(&key, in, strlen(in));
    n += (size_t)pd_device_init(&dev, &cfg, &key, NULL);
    pd_gatt_init(&gatt, &dev);
    pd_gatt_write_grant(&gatt, (const uint8_t *)in, strlen(in), &res);
    pd_gatt_write_credential(&gatt, (const uint8_t *)in, strlen(in), &creds, &res);
    pd_gatt_finish(&gatt, argc > 2, NULL, &res);
    pd_gatt_disconnected(&gatt);
    n += pd_fragment(res.status, res.status_len, 23, 0, out, sizeof out);
    n += pd_device_info(&dev, text, sizeof text);
    n += (size_t)pd_mqtt_parse_activation_reply(in, strlen(in), &act);
    n += pd_mqtt_activation_request(in, 2, dev.public_key, NULL, text, sizeof text);
    n += pd_mqtt_heartbeat(30, 1, text, sizeof text);
    n += (size_t)pd_mqtt_parse_command(in, strlen(in), text, sizeof text);
    n += pd_mqtt_command_ack(in, "ok", text, sizeof text);
    n += pd_mqtt_wifi_status(&dev.last_report, text, sizeof text);
    n += pd_mqtt_device_topic(in, 1, "heartbeat", text, sizeof text);
    pd_adv_service_data(1, 1, out);
    pd_device_deinit(&dev);
    return (int)n;
}
