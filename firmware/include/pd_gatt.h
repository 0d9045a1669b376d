/* The GATT profile of docs/ble-gatt.md as pure state machines: frames in,
 * values and notifications out, no BLE stack inside. The firmware's GATT
 * callbacks feed writes in and send what comes out. */
#ifndef PD_GATT_H
#define PD_GATT_H

#include <stddef.h>
#include <stdint.h>

#include "pd_device.h"

#ifdef __cplusplus
extern "C" {
#endif

#define PD_SERVICE_UUID "b7e10000-3f2a-4c55-9d0e-6a1f5c2e8d40"
#define PD_DEVICE_INFO_UUID "b7e10001-3f2a-4c55-9d0e-6a1f5c2e8d40"
#define PD_WIFI_GRANT_UUID "b7e10002-3f2a-4c55-9d0e-6a1f5c2e8d40"
#define PD_WIFI_CREDENTIAL_UUID "b7e10003-3f2a-4c55-9d0e-6a1f5c2e8d40"
#define PD_WIFI_STATUS_UUID "b7e10004-3f2a-4c55-9d0e-6a1f5c2e8d40"

#define PD_OP_DATA 0x01
#define PD_OP_COMMIT 0x02
#define PD_OP_ABORT 0x03
#define PD_DIGEST_LEN 8

/* ATT application errors a bad write is answered with. */
#define PD_ERR_BAD_OFFSET 0x80
#define PD_ERR_TOO_LARGE 0x81
#define PD_ERR_MALFORMED 0x82
#define PD_ERR_DIGEST 0x83

#define PD_STATUS_PLAIN 0x00
#define PD_STATUS_SEALED 0x01
#define PD_FRAG_MORE 0x80
/* A plain status: kind byte + {"reason":…(64),"stage":"credentials","state":"failed"}. */
#define PD_MAX_PLAIN_STATUS 128
/* Largest status message with its kind byte. */
#define PD_MAX_STATUS_MESSAGE (1 + PD_MAX_STATUS_LEN)
#define PD_ADV_SERVICE_DATA_LEN 6
#define PD_ADV_FLAG_WIFI_UPLOAD 0x01
#define PD_ADV_FLAG_BUSY 0x02

/* One chunked characteristic's reassembly; the buffer is the caller's. */
typedef struct {
    uint8_t *buf;
    size_t limit;
    size_t len;
} pd_reassembler_t;

void pd_reasm_init(pd_reassembler_t *r, uint8_t *buf, size_t limit);
void pd_reasm_reset(pd_reassembler_t *r);

#define PD_REASM_MORE 0 /* frame taken, value not complete */
#define PD_REASM_DONE 1 /* *value / *value_len hold the whole value */
/* Otherwise the ATT error (PD_ERR_*) to answer; the partial value is gone.
 * The value stays valid until the next feed. */
int pd_reasm_feed(pd_reassembler_t *r, const uint8_t *frame, size_t len, const uint8_t **value,
                  size_t *value_len);

/* Uploader side, for C centrals and tests: the COMMIT frame for a value
 * (11 bytes), and DATA frame `index` for it at this MTU (0 when past the end). */
void pd_commit_frame(const uint8_t *value, size_t len, uint8_t out[3 + PD_DIGEST_LEN]);
size_t pd_data_frame(const uint8_t *value, size_t len, size_t mtu, size_t index, uint8_t *out,
                     size_t cap);

/* Notifications for one status message at this ATT MTU. */
size_t pd_fragment_count(size_t message_len, size_t mtu);
/* Fragment `index` into out (at least mtu - 3 bytes); returns its length, 0 on misuse. */
size_t pd_fragment(const uint8_t *message, size_t message_len, size_t mtu, size_t index,
                   uint8_t *out, size_t cap);

/* Kind 0x00 plus sorted compact JSON; reason and stage may be NULL. Returns
 * the length, 0 if it does not fit or reason/stage are not codes. */
size_t pd_plain_status(const char *state, const char *reason, const char *stage, uint8_t *out,
                       size_t cap);

/* version 0x01 | device id u32 LE | flags. */
void pd_adv_service_data(uint32_t device_id, uint8_t flags, uint8_t out[PD_ADV_SERVICE_DATA_LEN]);

/* Device side of the whole profile on top of pd_device_t: one call per GATT
 * write, giving back at most one status message to notify (fragment it with
 * pd_fragment) and, after a credential write, the credentials to join with.
 * Joining is the firmware's job; report the outcome with pd_gatt_finish. */
typedef struct {
    pd_device_t *dev;
    pd_reassembler_t grant_rx;
    pd_reassembler_t cred_rx;
    uint8_t grant_buf[PD_MAX_GRANT_LEN];
    uint8_t cred_buf[PD_MAX_CREDENTIAL_LEN];
    uint8_t last_status[PD_MAX_STATUS_MESSAGE]; /* for reads of WiFi Status */
    size_t last_status_len;
} pd_gatt_t;

void pd_gatt_init(pd_gatt_t *g, pd_device_t *dev);
/* On disconnection: partial values are dropped. */
void pd_gatt_disconnected(pd_gatt_t *g);

typedef struct {
    int att_error;      /* nonzero: answer the write with this ATT error */
    size_t status_len;  /* nonzero: notify status[0..status_len) */
    uint8_t status[PD_MAX_STATUS_MESSAGE];
    int join;           /* credentials are valid: join the network now */
    int report;         /* the attempt ended: publish dev->last_report on MQTT */
} pd_gatt_result_t;

void pd_gatt_write_grant(pd_gatt_t *g, const uint8_t *frame, size_t len, pd_gatt_result_t *res);
void pd_gatt_write_credential(pd_gatt_t *g, const uint8_t *frame, size_t len,
                              pd_wifi_credentials_t *creds, pd_gatt_result_t *res);
/* The join finished: reason NULL when connected. */
void pd_gatt_finish(pd_gatt_t *g, int connected, const char *reason, pd_gatt_result_t *res);

#ifdef __cplusplus
}
#endif
#endif
