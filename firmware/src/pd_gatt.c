#include "pd_gatt.h"

#include <stdio.h>
#include <string.h>

#include "pd_crypto.h"

void pd_reasm_init(pd_reassembler_t *r, uint8_t *buf, size_t limit)
{
    r->buf = buf;
    r->limit = limit;
    r->len = 0;
}

void pd_reasm_reset(pd_reassembler_t *r)
{
    r->len = 0;
}

int pd_reasm_feed(pd_reassembler_t *r, const uint8_t *frame, size_t len, const uint8_t **value,
                  size_t *value_len)
{
    /* Every error drops the partial value, so the uploader starts again at
     * offset 0 rather than guessing what the device kept. */
    if (len == 0) {
        r->len = 0;
        return PD_ERR_MALFORMED;
    }
    switch (frame[0]) {
    case PD_OP_ABORT:
        r->len = 0;
        return PD_REASM_MORE;
    case PD_OP_DATA: {
        size_t offset;
        if (len < 3) {
            r->len = 0;
            return PD_ERR_MALFORMED;
        }
        offset = (size_t)frame[1] | ((size_t)frame[2] << 8);
        if (offset != r->len) {
            r->len = 0;
            return PD_ERR_BAD_OFFSET;
        }
        if (offset + (len - 3) > r->limit) {
            r->len = 0;
            return PD_ERR_TOO_LARGE;
        }
        memcpy(r->buf + r->len, frame + 3, len - 3);
        r->len += len - 3;
        return PD_REASM_MORE;
    }
    case PD_OP_COMMIT: {
        uint8_t digest[32];
        size_t total, have = r->len;
        r->len = 0;
        if (len != 3 + PD_DIGEST_LEN) {
            return PD_ERR_MALFORMED;
        }
        total = (size_t)frame[1] | ((size_t)frame[2] << 8);
        if (total != have || pd_sha256(r->buf, have, digest) != 0 ||
            memcmp(digest, frame + 3, PD_DIGEST_LEN) != 0) {
            return PD_ERR_DIGEST;
        }
        *value = r->buf;
        *value_len = have;
        return PD_REASM_DONE;
    }
    default:
        r->len = 0;
        return PD_ERR_MALFORMED;
    }
}

void pd_commit_frame(const uint8_t *value, size_t len, uint8_t out[3 + PD_DIGEST_LEN])
{
    uint8_t digest[32];
    pd_sha256(value, len, digest);
    out[0] = PD_OP_COMMIT;
    out[1] = (uint8_t)len;
    out[2] = (uint8_t)(len >> 8);
    memcpy(out + 3, digest, PD_DIGEST_LEN);
}

size_t pd_data_frame(const uint8_t *value, size_t len, size_t mtu, size_t index, uint8_t *out,
                     size_t cap)
{
    size_t room, start, n;
    if (mtu < 7 || cap < mtu - 3) return 0;
    room = mtu - 6;
    start = index * room;
    if (start >= len) return 0;
    n = len - start < room ? len - start : room;
    out[0] = PD_OP_DATA;
    out[1] = (uint8_t)start;
    out[2] = (uint8_t)(start >> 8);
    memcpy(out + 3, value + start, n);
    return n + 3;
}

size_t pd_fragment_count(size_t message_len, size_t mtu)
{
    size_t room;
    if (mtu < 5) return 0;
    room = mtu - 4;
    /* Even an empty message is one fragment: the header says "complete". */
    return message_len == 0 ? 1 : (message_len + room - 1) / room;
}

size_t pd_fragment(const uint8_t *message, size_t message_len, size_t mtu, size_t index,
                   uint8_t *out, size_t cap)
{
    size_t count = pd_fragment_count(message_len, mtu), room, start, n;
    if (count == 0 || index >= count || cap < mtu - 3) return 0;
    room = mtu - 4;
    start = index * room;
    n = message_len - start < room ? message_len - start : room;
    /* A notification longer than MTU - 3 is silently truncated by stacks, so
     * even a short message carries the header byte. */
    out[0] = (uint8_t)((index + 1 < count ? PD_FRAG_MORE : 0) | (index & 0x7F));
    if (n) memcpy(out + 1, message + start, n);
    return n + 1;
}

static int code_ok(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 64) return 0;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '_' || c == '-')) return 0;
    }
    return 1;
}

size_t pd_plain_status(const char *state, const char *reason, const char *stage, uint8_t *out,
                       size_t cap)
{
    int n;
    char *text = (char *)out + 1;
    if (cap < 2 || !code_ok(state) || (reason && !code_ok(reason)) || (stage && !code_ok(stage))) {
        return 0;
    }
    out[0] = PD_STATUS_PLAIN;
    if (reason && stage) {
        n = snprintf(text, cap - 1, "{\"reason\":\"%s\",\"stage\":\"%s\",\"state\":\"%s\"}", reason,
                     stage, state);
    } else if (reason) {
        n = snprintf(text, cap - 1, "{\"reason\":\"%s\",\"state\":\"%s\"}", reason, state);
    } else if (stage) {
        n = snprintf(text, cap - 1, "{\"stage\":\"%s\",\"state\":\"%s\"}", stage, state);
    } else {
        n = snprintf(text, cap - 1, "{\"state\":\"%s\"}", state);
    }
    if (n < 0 || (size_t)n >= cap - 1) return 0;
    return (size_t)n + 1;
}

void pd_adv_service_data(uint32_t device_id, uint8_t flags, uint8_t out[PD_ADV_SERVICE_DATA_LEN])
{
    out[0] = 0x01;
    out[1] = (uint8_t)device_id;
    out[2] = (uint8_t)(device_id >> 8);
    out[3] = (uint8_t)(device_id >> 16);
    out[4] = (uint8_t)(device_id >> 24);
    out[5] = flags;
}

/* ------------------------------------------------------------------ device glue */

void pd_gatt_init(pd_gatt_t *g, pd_device_t *dev)
{
    memset(g, 0, sizeof *g);
    g->dev = dev;
    pd_reasm_init(&g->grant_rx, g->grant_buf, sizeof g->grant_buf);
    pd_reasm_init(&g->cred_rx, g->cred_buf, sizeof g->cred_buf);
    g->last_status_len = pd_plain_status("idle", NULL, NULL, g->last_status, sizeof g->last_status);
}

void pd_gatt_disconnected(pd_gatt_t *g)
{
    pd_reasm_reset(&g->grant_rx);
    pd_reasm_reset(&g->cred_rx);
    pd_wipe(g->cred_buf, sizeof g->cred_buf);
}

static void emit(pd_gatt_t *g, pd_gatt_result_t *res, const uint8_t *msg, size_t len)
{
    memcpy(res->status, msg, len);
    res->status_len = len;
    memcpy(g->last_status, msg, len);
    g->last_status_len = len;
}

static void emit_plain(pd_gatt_t *g, pd_gatt_result_t *res, const char *reason, const char *stage)
{
    uint8_t msg[PD_MAX_PLAIN_STATUS];
    size_t n = pd_plain_status("failed", reason, stage, msg, sizeof msg);
    emit(g, res, msg, n);
}

static void emit_sealed(pd_gatt_t *g, pd_gatt_result_t *res, int final, int connected,
                        const char *reason)
{
    uint8_t msg[PD_MAX_STATUS_MESSAGE];
    size_t n = 0;
    int r = final ? pd_finish(g->dev, connected, reason, msg + 1, sizeof msg - 1, &n)
                  : pd_status_message(g->dev, NULL, msg + 1, sizeof msg - 1, &n);
    if (r != PD_OK) return;
    msg[0] = PD_STATUS_SEALED;
    emit(g, res, msg, n + 1);
    if (final) res->report = 1;
}

void pd_gatt_write_grant(pd_gatt_t *g, const uint8_t *frame, size_t len, pd_gatt_result_t *res)
{
    const uint8_t *value;
    size_t value_len;
    int r;
    memset(res, 0, sizeof *res);
    r = pd_reasm_feed(&g->grant_rx, frame, len, &value, &value_len);
    if (r == PD_REASM_MORE) return;
    if (r != PD_REASM_DONE) {
        res->att_error = r;
        return;
    }
    r = pd_accept_grant(g->dev, (const char *)value, value_len, NULL);
    if (r != PD_OK) {
        /* No session key exists for a refused grant: the refusal is plain. */
        emit_plain(g, res, pd_reason_str(r), "grant");
        return;
    }
    emit_sealed(g, res, 0, 0, NULL);
}

void pd_gatt_write_credential(pd_gatt_t *g, const uint8_t *frame, size_t len,
                              pd_wifi_credentials_t *creds, pd_gatt_result_t *res)
{
    const uint8_t *value;
    size_t value_len;
    int r;
    memset(res, 0, sizeof *res);
    r = pd_reasm_feed(&g->cred_rx, frame, len, &value, &value_len);
    if (r == PD_REASM_MORE) return;
    if (r != PD_REASM_DONE) {
        res->att_error = r;
        return;
    }
    r = pd_receive_credentials(g->dev, value, value_len, creds);
    pd_wipe(g->cred_buf, value_len);
    if (r == PD_OK) {
        emit_sealed(g, res, 0, 0, NULL);
        res->join = 1;
    } else if (g->dev->state == PD_STATE_FAILED) {
        /* The grant was spent on this message: the verdict is sealed. */
        emit_sealed(g, res, 1, 0, pd_reason_str(r));
    } else {
        emit_plain(g, res, pd_reason_str(r), "credentials");
    }
}

void pd_gatt_finish(pd_gatt_t *g, int connected, const char *reason, pd_gatt_result_t *res)
{
    memset(res, 0, sizeof *res);
    emit_sealed(g, res, 1, connected, reason);
}
