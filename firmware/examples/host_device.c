/* A device on a host: the firmware library plus libmosquitto.
 *
 * It activates with a provision token, stays online (retained status, last
 * will, heartbeats), acks reconfigure commands, and takes a WiFi grant and a
 * credential message from stdin as a BLE central would write them, then
 * reports the outcome on P/devices/N/wifi/status. It is what tests/
 * test_firmware_host_device.py runs against the real daemon, and a template
 * for the MQTT half of real firmware.
 *
 *   pd_host_device --host H --port P --prefix PFX --device-id N --token T
 *                  --state DIR [--ssid SSID] [--heartbeat SECONDS]
 *
 * The password of the one network in range comes from $PD_WIFI_PASSWORD,
 * never argv. stdin lines: INFO | GRANT <blob> | CRED <hex> | QUIT. stdout
 * lines: "activated …", "heartbeat", "ack …", "info {json}", "grant …",
 * "status <hex>" (each sealed status, kind byte included), "wifi …".
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <fcntl.h>
#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "pd_device.h"
#include "pd_gatt.h"
#include "pd_mqtt.h"

typedef struct {
    const char *host, *prefix, *token, *state_dir, *ssid;
    int port;
    uint32_t device_id;
    double heartbeat;
    struct mosquitto *mosq;
    int subscribed, activated, done, failed;
    uint8_t correlation[16];
    uint8_t public_key[PD_KEY_LEN];
    pd_config_t cfg;
    pd_device_t dev;
    pd_gatt_t gatt;
    double next_beat;
    double started;
} app_t;

static double monotonic(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int64_t wall_now(void *ctx)
{
    (void)ctx;
    return (int64_t)time(NULL);
}

static int urandom(void *ctx, uint8_t *buf, size_t len)
{
    int fd = open("/dev/urandom", O_RDONLY);
    size_t got = 0;
    (void)ctx;
    if (fd < 0) return -1;
    while (got < len) {
        ssize_t n = read(fd, buf + got, len - got);
        if (n <= 0) break;
        got += (size_t)n;
    }
    close(fd);
    return got == len ? 0 : -1;
}

static int path_in(const app_t *app, const char *name, char *out, size_t cap)
{
    int n = snprintf(out, cap, "%s/%s", app->state_dir, name);
    return n > 0 && (size_t)n < cap ? 0 : -1;
}

/* Write-then-rename, so a power cut leaves the old state or the new one. */
static int write_file(const char *path, const void *data, size_t len)
{
    char tmp[512];
    int fd, ok;
    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC, 0600);
    if (fd < 0) return -1;
    ok = write(fd, data, len) == (ssize_t)len && fsync(fd) == 0;
    close(fd);
    return ok && rename(tmp, path) == 0 ? 0 : -1;
}

static int read_file(const char *path, void *data, size_t len)
{
    int fd = open(path, O_RDONLY);
    ssize_t n;
    if (fd < 0) return -1;
    n = read(fd, data, len);
    close(fd);
    return n == (ssize_t)len ? 0 : -1;
}

static int persist(void *ctx, const pd_freshness_t *state)
{
    char path[512];
    if (path_in((const app_t *)ctx, "freshness.bin", path, sizeof path) != 0) return -1;
    return write_file(path, state, sizeof *state);
}

static void publish(app_t *app, const char *suffix, const char *payload, int qos, int retain)
{
    char topic[PD_MAX_TOPIC_LEN + 32];
    if (!pd_mqtt_device_topic(app->prefix, app->device_id, suffix, topic, sizeof topic)) return;
    mosquitto_publish_v5(app->mosq, NULL, topic, (int)strlen(payload), payload, qos, retain, NULL);
}

static void heartbeat(app_t *app)
{
    char body[PD_HEARTBEAT_LEN];
    if (pd_mqtt_heartbeat(app->heartbeat, (uint64_t)(monotonic() - app->started), body, sizeof body)) {
        publish(app, "heartbeat", body, 0, 0);
        printf("heartbeat\n");
    }
    app->next_beat = monotonic() + app->heartbeat;
}

static void send_activation(app_t *app)
{
    char topic[PD_MAX_TOPIC_LEN + 32], reply[PD_MAX_TOPIC_LEN + 32], body[PD_ACTIVATION_REQUEST_LEN];
    mosquitto_property *props = NULL;
    pd_mqtt_activate_topic(app->prefix, topic, sizeof topic);
    /* Inside the device's own subtree, which its broker ACL allows. */
    pd_mqtt_device_topic(app->prefix, app->device_id, "replies/activate", reply, sizeof reply);
    pd_mqtt_activation_request(app->token, PD_CAP_WIFI_UPLOAD, app->public_key, "host-1.0",
                               body, sizeof body);
    urandom(NULL, app->correlation, sizeof app->correlation);
    mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, reply);
    mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, app->correlation,
                                  sizeof app->correlation);
    mosquitto_publish_v5(app->mosq, NULL, topic, (int)strlen(body), body, 1, 0, props);
    mosquitto_property_free_all(&props);
}

static void on_connect(struct mosquitto *mosq, void *obj, int rc, int flags,
                       const mosquitto_property *props)
{
    app_t *app = obj;
    char topic[PD_MAX_TOPIC_LEN + 32];
    (void)flags;
    (void)props;
    if (rc != 0) {
        fprintf(stderr, "connect refused: %d\n", rc);
        app->failed = 1;
        return;
    }
    if (app->activated) {
        /* Back after a lost connection: the broker published our will. */
        publish(app, "status", "online", 1, 1);
    }
    app->subscribed = 0;
    pd_mqtt_device_topic(app->prefix, app->device_id, "replies/activate", topic, sizeof topic);
    mosquitto_subscribe_v5(mosq, NULL, topic, 1, 0, NULL);
    pd_mqtt_device_topic(app->prefix, app->device_id, "commands/reconfigure", topic, sizeof topic);
    mosquitto_subscribe_v5(mosq, NULL, topic, 1, 0, NULL);
}

static void on_subscribe(struct mosquitto *mosq, void *obj, int mid, int count, const int *granted)
{
    app_t *app = obj;
    (void)mosq;
    (void)mid;
    if (count < 1 || granted[0] > 2) {
        app->failed = 1;
        return;
    }
    /* Ask only once both subscriptions stand, or the reply could be lost;
     * and only once: the token is spent by the first activation. */
    if (++app->subscribed == 2 && !app->activated) send_activation(app);
}

static void on_activation_reply(app_t *app, const struct mosquitto_message *msg,
                                const mosquitto_property *props)
{
    pd_activation_t act;
    void *corr = NULL;
    uint16_t corr_len = 0;
    int rc;
    if (!mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false) ||
        corr_len != sizeof app->correlation || memcmp(corr, app->correlation, corr_len) != 0) {
        free(corr);
        return;
    }
    free(corr);
    if (pd_mqtt_parse_activation_reply(msg->payload, (size_t)msg->payloadlen, &act) != 0 ||
        act.status != 200) {
        printf("activation refused status=%d\n", act.status);
        app->failed = 1;
        return;
    }
    if (!act.has_key) {
        printf("activation: no ES256 or HS256 grant key (the gateway must sign with ES256)\n");
        app->failed = 1;
        return;
    }
    /* Pin the key for good; freshness comes back from "flash". */
    {
        static pd_freshness_t fresh;
        char path[512];
        int have = path_in(app, "freshness.bin", path, sizeof path) == 0 &&
                   read_file(path, &fresh, sizeof fresh) == 0;
        rc = pd_device_init(&app->dev, &app->cfg, &act.key, have ? &fresh : NULL);
    }
    if (rc != PD_OK) {
        printf("device init failed: %s\n", pd_reason_str(rc));
        app->failed = 1;
        return;
    }
    pd_gatt_init(&app->gatt, &app->dev);
    app->activated = 1;
    if (app->heartbeat <= 0) app->heartbeat = act.heartbeat_interval > 0 ? act.heartbeat_interval : 30;
    printf("activated device_id=%lu alg=%s kid=%s gateway=%s\n", (unsigned long)act.device_id,
           act.key.alg == PD_ALG_ES256 ? "ES256" : "HS256", act.key.kid, act.gateway_id);
    publish(app, "status", "online", 1, 1);
    heartbeat(app);
}

static void on_message(struct mosquitto *mosq, void *obj, const struct mosquitto_message *msg,
                       const mosquitto_property *props)
{
    app_t *app = obj;
    char suffix_cmd[PD_MAX_TOPIC_LEN + 32], suffix_reply[PD_MAX_TOPIC_LEN + 32];
    (void)mosq;
    pd_mqtt_device_topic(app->prefix, app->device_id, "commands/reconfigure", suffix_cmd, sizeof suffix_cmd);
    pd_mqtt_device_topic(app->prefix, app->device_id, "replies/activate", suffix_reply, sizeof suffix_reply);
    if (strcmp(msg->topic, suffix_reply) == 0 && !app->activated) {
        on_activation_reply(app, msg, props);
    } else if (strcmp(msg->topic, suffix_cmd) == 0 && app->activated) {
        char id[PD_MAX_COMMAND_ID_LEN + 1], ack[PD_ACK_LEN];
        if (pd_mqtt_parse_command(msg->payload, (size_t)msg->payloadlen, id, sizeof id) == 0 &&
            pd_mqtt_command_ack(id, "ok", ack, sizeof ack)) {
            publish(app, "commands/ack", ack, 1, 0);
            printf("ack id=%s\n", id);
        }
    }
}

static void print_status(const pd_gatt_result_t *res)
{
    if (!res->status_len) return;
    printf("status ");
    for (size_t i = 0; i < res->status_len; i++) printf("%02x", res->status[i]);
    printf("\n");
}

/* Feed a whole value through the GATT state machine, framed as a central
 * with MTU 188 would write it. */
static void write_framed(app_t *app, int credential, const uint8_t *value, size_t len,
                         pd_wifi_credentials_t *creds, pd_gatt_result_t *res)
{
    uint8_t frame[185];
    size_t n;
    for (size_t i = 0; (n = pd_data_frame(value, len, sizeof frame + 3, i, frame, sizeof frame)); i++) {
        if (credential) pd_gatt_write_credential(&app->gatt, frame, n, creds, res);
        else pd_gatt_write_grant(&app->gatt, frame, n, res);
    }
    pd_commit_frame(value, len, frame);
    if (credential) pd_gatt_write_credential(&app->gatt, frame, 3 + PD_DIGEST_LEN, creds, res);
    else pd_gatt_write_grant(&app->gatt, frame, 3 + PD_DIGEST_LEN, res);
}

static void report(app_t *app)
{
    char body[PD_WIFI_STATUS_LEN];
    const pd_report_t *r = &app->dev.last_report;
    if (pd_mqtt_wifi_status(r, body, sizeof body)) {
        publish(app, "wifi/status", body, 1, 0);
        printf("wifi state=%s grant=%s reason=%s\n", r->connected ? "connected" : "failed",
               r->grant_id, r->connected ? "-" : r->reason);
    }
}

static int unhex(const char *hex, uint8_t *out, size_t cap, size_t *len)
{
    size_t n = strlen(hex);
    if (n % 2 || n / 2 > cap) return -1;
    for (size_t i = 0; i < n / 2; i++) {
        unsigned v;
        if (sscanf(hex + 2 * i, "%2x", &v) != 1) return -1;
        out[i] = (uint8_t)v;
    }
    *len = n / 2;
    return 0;
}

static void command(app_t *app, char *line)
{
    static uint8_t value[PD_MAX_GRANT_LEN + 16];
    pd_gatt_result_t res;
    if (strcmp(line, "QUIT") == 0) {
        app->done = 1;
        return;
    }
    if (!app->activated) {
        printf("error not activated\n");
        return;
    }
    if (strcmp(line, "INFO") == 0) {
        char info[PD_DEVICE_INFO_LEN];
        pd_device_info(&app->dev, info, sizeof info);
        printf("info %s\n", info);
    } else if (strncmp(line, "GRANT ", 6) == 0) {
        write_framed(app, 0, (const uint8_t *)line + 6, strlen(line + 6), NULL, &res);
        if (res.att_error) printf("error att=0x%02x\n", res.att_error);
        /* Sealed means accepted; a refusal is plain (there is no key yet). */
        printf("grant %s\n",
               res.status_len && res.status[0] == PD_STATUS_SEALED ? "accepted" : "refused");
        print_status(&res);
    } else if (strncmp(line, "CRED ", 5) == 0) {
        pd_wifi_credentials_t creds;
        size_t len;
        if (unhex(line + 5, value, sizeof value, &len) != 0) {
            printf("error bad hex\n");
            return;
        }
        write_framed(app, 1, value, len, &creds, &res);
        print_status(&res);
        if (res.join) {
            /* The simulated radio: one network in range. */
            const char *password = getenv("PD_WIFI_PASSWORD");
            int ssid_ok = app->ssid && creds.ssid_len == strlen(app->ssid) &&
                          memcmp(creds.ssid, app->ssid, creds.ssid_len) == 0;
            int pass_ok = password && strcmp(password, creds.password) == 0;
            pd_wipe(&creds, sizeof creds);
            pd_gatt_finish(&app->gatt, ssid_ok && pass_ok,
                           !ssid_ok ? "ssid_not_found" : pass_ok ? NULL : "wrong_password", &res);
            print_status(&res);
        }
        if (res.report) report(app);
    } else {
        printf("error unknown command\n");
    }
}

static int usage(void)
{
    fprintf(stderr, "usage: pd_host_device --host H --port P --prefix PFX --device-id N --token T "
                    "--state DIR [--ssid SSID] [--heartbeat S]\n");
    return 2;
}

int main(int argc, char **argv)
{
    static app_t app;
    static char line[2 * PD_MAX_CREDENTIAL_LEN + PD_MAX_GRANT_LEN + 64];
    size_t line_len = 0;
    char path[512], topic[PD_MAX_TOPIC_LEN + 32], client_id[64];
    int rc;

    app.host = "127.0.0.1";
    app.port = 1883;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--host")) app.host = argv[i + 1];
        else if (!strcmp(argv[i], "--port")) app.port = atoi(argv[i + 1]);
        else if (!strcmp(argv[i], "--prefix")) app.prefix = argv[i + 1];
        else if (!strcmp(argv[i], "--device-id")) app.device_id = (uint32_t)strtoul(argv[i + 1], NULL, 10);
        else if (!strcmp(argv[i], "--token")) app.token = argv[i + 1];
        else if (!strcmp(argv[i], "--state")) app.state_dir = argv[i + 1];
        else if (!strcmp(argv[i], "--ssid")) app.ssid = argv[i + 1];
        else if (!strcmp(argv[i], "--heartbeat")) app.heartbeat = atof(argv[i + 1]);
        else return usage();
    }
    if (!app.prefix || !app.device_id || !app.token || !app.state_dir) return usage();
    setvbuf(stdout, NULL, _IOLBF, 0);

    /* The X25519 key is made once and kept, like a device's flash. */
    memset(&app.cfg, 0, sizeof app.cfg);
    if (path_in(&app, "x25519.key", path, sizeof path) != 0) return usage();
    if (read_file(path, app.cfg.private_key, 32) != 0) {
        if (urandom(NULL, app.cfg.private_key, 32) != 0 || write_file(path, app.cfg.private_key, 32) != 0) {
            fprintf(stderr, "cannot create %s\n", path);
            return 1;
        }
    }
    app.cfg.device_id = app.device_id;
    app.cfg.capabilities = PD_CAP_WIFI_UPLOAD;
    app.cfg.has_clock = 1;
    app.cfg.leeway = PD_DEFAULT_LEEWAY;
    app.cfg.now = wall_now;
    app.cfg.random = urandom;
    app.cfg.persist = persist;
    app.cfg.ctx = &app;
    /* Before activation there is no pinned key, so no device yet: the public
     * key is all activation needs. */
    if (pd_public_key(app.cfg.private_key, app.public_key, urandom, NULL) != PD_OK) {
        fprintf(stderr, "cannot derive the public key\n");
        return 1;
    }

    mosquitto_lib_init();
    snprintf(client_id, sizeof client_id, "pd-host-%lu-%d", (unsigned long)app.device_id, (int)getpid());
    app.mosq = mosquitto_new(client_id, true, &app);
    mosquitto_int_option(app.mosq, MOSQ_OPT_PROTOCOL_VERSION, MQTT_PROTOCOL_V5);
    pd_mqtt_device_topic(app.prefix, app.device_id, "status", topic, sizeof topic);
    mosquitto_will_set_v5(app.mosq, topic, 7, "offline", 1, true, NULL);
    mosquitto_connect_v5_callback_set(app.mosq, on_connect);
    mosquitto_subscribe_callback_set(app.mosq, on_subscribe);
    mosquitto_message_v5_callback_set(app.mosq, on_message);
    app.started = monotonic();
    rc = mosquitto_connect(app.mosq, app.host, app.port, 30);
    if (rc != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "connect: %s\n", mosquitto_strerror(rc));
        return 1;
    }

    while (!app.done && !app.failed) {
        struct pollfd pfd = {0, POLLIN, 0};
        rc = mosquitto_loop(app.mosq, 50, 1);
        if (rc == MOSQ_ERR_CONN_LOST || rc == MOSQ_ERR_NO_CONN) {
            fprintf(stderr, "mqtt: %s, reconnecting\n", mosquitto_strerror(rc));
            sleep(1);
            mosquitto_reconnect(app.mosq);
        } else if (rc != MOSQ_ERR_SUCCESS) {
            fprintf(stderr, "mqtt: %s\n", mosquitto_strerror(rc));
            break;
        }
        if (app.activated && monotonic() >= app.next_beat) heartbeat(&app);
        while (poll(&pfd, 1, 0) > 0 && (pfd.revents & (POLLIN | POLLHUP))) {
            ssize_t n;
            char *nl;
            if (line_len + 1 >= sizeof line) line_len = 0; /* an oversized line is dropped */
            n = read(0, line + line_len, sizeof line - 1 - line_len);
            if (n <= 0) {
                app.done = 1;
                break;
            }
            line_len += (size_t)n;
            line[line_len] = '\0';
            while ((nl = strchr(line, '\n')) != NULL) {
                *nl = '\0';
                command(&app, line);
                memmove(line, nl + 1, line_len - (size_t)(nl + 1 - line) + 1);
                line_len -= (size_t)(nl + 1 - line);
            }
        }
    }
    if (app.activated) {
        publish(&app, "status", "offline", 1, 1);
        /* Let the offline status out before the clean disconnect. */
        for (int i = 0; i < 10; i++) mosquitto_loop(app.mosq, 20, 1);
    }
    mosquitto_disconnect(app.mosq);
    mosquitto_destroy(app.mosq);
    mosquitto_lib_cleanup();
    pd_device_deinit(&app.dev);
    pd_wipe(&app.cfg, sizeof app.cfg);
    return app.failed ? 3 : 0;
}
