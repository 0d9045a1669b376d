/* The state machines beyond the vectors: a whole GATT upload with a C
 * uploader, framing errors, freshness across a reboot, the ledger bound,
 * persistence failure, credential failures, and the MQTT payloads. */
#include <string.h>

#include "pd_crypto.h"
#include "pd_internal.h"
#include "pd_gatt.h"
#include "pd_mqtt.h"
#include "pd_test.h"

static const uint8_t HS_KEY[32] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16,
                                   17, 18, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32};
static int64_t NOW = 1750000000;

typedef struct {
    int calls;
    int fail;
    pd_freshness_t saved;
} store_t;

static int persist(void *ctx, const pd_freshness_t *f)
{
    store_t *s = (store_t *)((void **)ctx)[1];
    s->calls++;
    if (s->fail) return -1;
    s->saved = *f;
    return 0;
}

static int64_t now_fn(void *ctx)
{
    return *(int64_t *)((void **)ctx)[0];
}

static void *CTX[2];
static store_t STORE;
static uint8_t DEVICE_PRIV[32] = {7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
                                  7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 9};

static void make_device(pd_device_t *dev, int has_clock, int require_nonce,
                        const pd_freshness_t *restored)
{
    pd_config_t cfg;
    pd_key_t key;
    char jwk[200], b64[64];
    memset(&cfg, 0, sizeof cfg);
    cfg.device_id = 42;
    cfg.capabilities = PD_CAP_WIFI_UPLOAD;
    memcpy(cfg.private_key, DEVICE_PRIV, 32);
    cfg.has_clock = has_clock;
    cfg.leeway = 30;
    cfg.require_nonce = require_nonce;
    cfg.now = now_fn;
    cfg.random = pd_test_random;
    cfg.persist = persist;
    CTX[0] = &NOW;
    CTX[1] = &STORE;
    cfg.ctx = CTX;
    pd_b64url_encode(HS_KEY, 32, b64, sizeof b64);
    snprintf(jwk, sizeof jwk, "{\"kty\":\"oct\",\"k\":\"%s\",\"kid\":\"hs256-dev-42\",\"alg\":\"HS256\",\"use\":\"sig\"}", b64);
    CHECK_EQ_INT(pd_key_from_jwk(&key, jwk, strlen(jwk)), PD_OK);
    CHECK_EQ_INT(pd_device_init(dev, &cfg, &key, restored), PD_OK);
}

/* A grant as the daemon makes it, for an ephemeral key `e`. */
static size_t grant(const pd_device_t *dev, const uint8_t e[32], int64_t iat, int jti_byte,
                    int with_dn, char *out, size_t cap)
{
    uint8_t epk[32], jti[16];
    char claims[512], epk_b64[48], jti_b64[32], dn_b64[32], dn[48] = "";
    pd_x25519_base(e, epk, pd_test_random, NULL);
    memset(jti, jti_byte, sizeof jti);
    pd_b64url_encode(epk, 32, epk_b64, sizeof epk_b64);
    pd_b64url_encode(jti, 16, jti_b64, sizeof jti_b64);
    if (with_dn) {
        pd_b64url_encode(dev->nonce, 16, dn_b64, sizeof dn_b64);
        snprintf(dn, sizeof dn, ",\"dn\":\"%s\"", dn_b64);
    }
    snprintf(claims, sizeof claims,
             "{\"iss\":\"gw\",\"sub\":\"42\",\"aud\":\"wifi-config\",\"iat\":%lld,\"exp\":%lld,"
             "\"jti\":\"%s\",\"cap\":2,\"epk\":\"%s\"%s}",
             (long long)iat, (long long)iat + 120, jti_b64, epk_b64, dn);
    return pd_test_hs256_grant(HS_KEY, 32, "hs256-dev-42", claims, out, cap);
}

/* The uploader: frames for one value at this MTU, fed to the device. */
static void write_value(pd_gatt_t *g, int credential, const uint8_t *value, size_t len, size_t mtu,
                        pd_wifi_credentials_t *creds, pd_gatt_result_t *res)
{
    uint8_t frame[600], digest[32];
    size_t room = mtu - 6;
    for (size_t off = 0; off < len; off += room) {
        size_t n = len - off < room ? len - off : room;
        frame[0] = PD_OP_DATA;
        frame[1] = (uint8_t)off;
        frame[2] = (uint8_t)(off >> 8);
        memcpy(frame + 3, value + off, n);
        if (credential) pd_gatt_write_credential(g, frame, n + 3, creds, res);
        else pd_gatt_write_grant(g, frame, n + 3, res);
        CHECK_EQ_INT(res->att_error, 0);
        CHECK_EQ_INT(res->status_len, 0);
    }
    pd_sha256(value, len, digest);
    frame[0] = PD_OP_COMMIT;
    frame[1] = (uint8_t)len;
    frame[2] = (uint8_t)(len >> 8);
    memcpy(frame + 3, digest, 8);
    if (credential) pd_gatt_write_credential(g, frame, 11, creds, res);
    else pd_gatt_write_grant(g, frame, 11, res);
}

/* Join notifications back as the bridge does, then open them in order. */
static void read_sealed(const pd_gatt_result_t *res, size_t mtu, const uint8_t k_down[32],
                        uint64_t counter, const char *want_state)
{
    uint8_t frag[600], joined[400], plain[300], nonce[12] = {0};
    size_t count = pd_fragment_count(res->status_len, mtu), jl = 0;
    for (size_t i = 0; i < count; i++) {
        size_t n = pd_fragment(res->status, res->status_len, mtu, i, frag, sizeof frag);
        CHECK(n >= 1 && n <= mtu - 3);
        CHECK_EQ_INT(frag[0] & 0x7F, i & 0x7F);
        CHECK_EQ_INT(!!(frag[0] & PD_FRAG_MORE), i + 1 < count);
        memcpy(joined + jl, frag + 1, n - 1);
        jl += n - 1;
    }
    CHECK(jl == res->status_len && memcmp(joined, res->status, jl) == 0);
    CHECK_EQ_INT(joined[0], PD_STATUS_SEALED);
    for (int i = 0; i < 8; i++) nonce[11 - i] = (uint8_t)(counter >> (8 * i));
    CHECK(pd_gcm_open(k_down, nonce, "provisiond wifi-status v1", joined + 1, jl - 1, plain) == 0);
    plain[jl - 1 - 16] = 0;
    if (!strstr((char *)plain, want_state)) {
        fprintf(stderr, "status %s, expected %s\n", plain, want_state);
        pd_test_failures++;
    }
}

static void gatt_upload(size_t mtu, const char *password, const char *final_state)
{
    static pd_device_t dev;
    static pd_gatt_t g;
    pd_gatt_result_t res;
    pd_wifi_credentials_t creds;
    uint8_t e[32], z[32], k[64], nonce[12], msg[300];
    char blob[1024], plain[200];
    size_t bl, pl;
    make_device(&dev, 1, 1, NULL);
    pd_gatt_init(&g, &dev);
    pd_test_random(NULL, e, 32);
    NOW++;
    bl = grant(&dev, e, NOW, (int)mtu, 1, blob, sizeof blob);
    write_value(&g, 0, (const uint8_t *)blob, bl, mtu, NULL, &res);
    CHECK_EQ_INT(res.att_error, 0);
    CHECK(pd_x25519(e, dev.public_key, z, pd_test_random, NULL) == 0);
    CHECK(pd_session_keys(z, blob, bl, k) == PD_OK);
    read_sealed(&res, mtu, k + 32, 0, "\"state\":\"grant-accepted\"");

    pl = (size_t)snprintf(plain, sizeof plain,
                          "{\"ssid\":\"lab\",\"password\":\"%s\",\"security\":\"wpa2-psk\"}", password);
    pd_test_random(NULL, nonce, 12);
    memcpy(msg, nonce, 12);
    CHECK(pd_gcm_seal(k, nonce, "provisiond wifi-credential v1", (uint8_t *)plain, pl, msg + 12) == 0);
    write_value(&g, 1, msg, 12 + pl + 16, mtu, &creds, &res);
    read_sealed(&res, mtu, k + 32, 1, "\"state\":\"connecting\"");
    CHECK(res.join);
    CHECK(strcmp(creds.ssid, "lab") == 0 && strcmp(creds.password, password) == 0);
    /* The firmware joins; here the password decides. */
    pd_gatt_finish(&g, strcmp(password, "correct horse") == 0,
                   strcmp(password, "correct horse") == 0 ? NULL : "wrong_password", &res);
    CHECK(res.report);
    read_sealed(&res, mtu, k + 32, 2, final_state);
    CHECK_EQ_INT(dev.state, PD_STATE_IDLE);
    /* The read value is the last message, kind byte included. */
    CHECK(g.last_status_len == res.status_len && memcmp(g.last_status, res.status, res.status_len) == 0);

    /* The captured grant replayed over GATT: refused in plain text. */
    write_value(&g, 0, (const uint8_t *)blob, bl, mtu, NULL, &res);
    CHECK(res.status_len > 0 && res.status[0] == PD_STATUS_PLAIN);
    CHECK(res.status_len - 1 == strlen("{\"reason\":\"replayed\",\"stage\":\"grant\",\"state\":\"failed\"}") &&
          memcmp(res.status + 1, "{\"reason\":\"replayed\",\"stage\":\"grant\",\"state\":\"failed\"}",
                 res.status_len - 1) == 0);
    /* A credential message with no grant: plain, stage credentials. */
    write_value(&g, 1, msg, 12 + pl + 16, mtu, &creds, &res);
    CHECK(res.status_len > 0 && res.status[0] == PD_STATUS_PLAIN &&
          strstr((char *)res.status + 1, "\"reason\":\"no_grant\",\"stage\":\"credentials\"") != NULL);
    pd_device_deinit(&dev);
}

static void framing(void)
{
    static uint8_t buf[16];
    pd_reassembler_t r;
    const uint8_t *v;
    size_t vl;
    uint8_t f[20], digest[32];
    pd_reasm_init(&r, buf, sizeof buf);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 0, &v, &vl), PD_ERR_MALFORMED);
    f[0] = 0x09;
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 1, &v, &vl), PD_ERR_MALFORMED);
    f[0] = PD_OP_DATA;
    f[1] = 0;
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 2, &v, &vl), PD_ERR_MALFORMED);
    f[1] = 1;
    f[2] = 0;
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 5, &v, &vl), PD_ERR_BAD_OFFSET);
    f[1] = 0;
    memcpy(f + 3, "abcdefghijklmnopq", 17);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 20, &v, &vl), PD_ERR_TOO_LARGE);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 8, &v, &vl), PD_REASM_MORE);
    f[0] = PD_OP_ABORT;
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 1, &v, &vl), PD_REASM_MORE);
    CHECK_EQ_INT(r.len, 0);
    f[0] = PD_OP_DATA;
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 8, &v, &vl), PD_REASM_MORE);
    pd_sha256((const uint8_t *)"abcdf", 5, digest);
    f[0] = PD_OP_COMMIT;
    f[1] = 5;
    f[2] = 0;
    memcpy(f + 3, digest, 8);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 11, &v, &vl), PD_ERR_DIGEST);
    CHECK_EQ_INT(r.len, 0);
    f[0] = PD_OP_DATA;
    f[1] = 0;
    memcpy(f + 3, "abcde", 5);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 8, &v, &vl), PD_REASM_MORE);
    pd_sha256((const uint8_t *)"abcde", 5, digest);
    f[0] = PD_OP_COMMIT;
    f[1] = 5;
    memcpy(f + 3, digest, 8);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 10, &v, &vl), PD_ERR_MALFORMED);
    f[0] = PD_OP_DATA;
    f[1] = 0;
    memcpy(f + 3, "abcde", 5);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 8, &v, &vl), PD_REASM_MORE);
    f[0] = PD_OP_COMMIT;
    f[1] = 5;
    memcpy(f + 3, digest, 8);
    CHECK_EQ_INT(pd_reasm_feed(&r, f, 11, &v, &vl), PD_REASM_DONE);
    CHECK(vl == 5 && memcmp(v, "abcde", 5) == 0);

    /* Fragment headers: index modulo 128, bit 7 on all but the last. */
    {
        static uint8_t big[300];
        uint8_t out[32];
        CHECK_EQ_INT(pd_fragment_count(0, 23), 1);
        CHECK_EQ_INT(pd_fragment(big, 0, 23, 0, out, sizeof out), 1);
        CHECK_EQ_INT(out[0], 0);
        CHECK_EQ_INT(pd_fragment_count(300, 23), 16);
        CHECK_EQ_INT(pd_fragment(big, 300, 23, 15, out, sizeof out), 1 + 300 - 15 * 19);
        CHECK_EQ_INT(out[0], 15);
        CHECK_EQ_INT(pd_fragment(big, 300, 23, 3, out, sizeof out), 20);
        CHECK_EQ_INT(out[0], 0x83);
        CHECK_EQ_INT(pd_fragment_count(300, 5), 300);
        CHECK_EQ_INT(pd_fragment(big, 300, 5, 130, out, sizeof out), 2);
        CHECK_EQ_INT(out[0], 0x80 | 2);
        CHECK_EQ_INT(pd_fragment_count(10, 4), 0);
    }
    {
        uint8_t out[128], adv[6];
        size_t n = pd_plain_status("idle", NULL, NULL, out, sizeof out);
        CHECK(n == 17 && out[0] == 0 && memcmp(out + 1, "{\"state\":\"idle\"}", 16) == 0);
        CHECK_EQ_INT(pd_plain_status("failed", "Bad Reason", "grant", out, sizeof out), 0);
        pd_adv_service_data(0x01020304, PD_ADV_FLAG_WIFI_UPLOAD, adv);
        CHECK(memcmp(adv, "\x01\x04\x03\x02\x01\x01", 6) == 0);
    }
}

static void freshness(void)
{
    static pd_device_t dev, dev2;
    uint8_t e[32] = {5};
    char blob[1024];
    size_t bl;
    pd_wifi_credentials_t creds;
    uint8_t out[256];
    size_t ol;
    int64_t iat;

    memset(&STORE, 0, sizeof STORE);
    make_device(&dev, 1, 0, NULL);
    iat = NOW;
    bl = grant(&dev, e, iat, 1, 0, blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, bl, NULL), PD_OK);
    CHECK_EQ_INT(STORE.calls, 1);
    CHECK(STORE.saved.count == 1 && STORE.saved.last_iat == iat);
    /* Busy while connecting; a pending grant is superseded. */
    bl = grant(&dev, e, iat + 1, 2, 0, blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, bl, NULL), PD_OK);
    {
        /* An undecryptable credential message spends the grant. */
        uint8_t junk[64] = {0};
        CHECK_EQ_INT(pd_receive_credentials(&dev, junk, sizeof junk, &creds), PD_DECRYPT_FAILED);
        CHECK_EQ_INT(dev.state, PD_STATE_FAILED);
        CHECK_EQ_INT(pd_finish(&dev, 0, NULL, out, sizeof out, &ol), PD_OK);
        CHECK(strcmp(dev.last_report.reason, "decrypt_failed") == 0);
    }
    /* Reboot: a device restored from flash still refuses the old grants. */
    make_device(&dev2, 1, 0, &STORE.saved);
    CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_REPLAYED);
    bl = grant(&dev2, e, iat + 1, 3, 0, blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_STALE_IAT);
    /* Storage failure: nothing changes. */
    STORE.fail = 1;
    {
        pd_freshness_t before = dev2.fresh;
        int calls = STORE.calls;
        bl = grant(&dev2, e, iat + 2, 4, 0, blob, sizeof blob);
        CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_STORAGE_FAILED);
        CHECK(memcmp(&before, &dev2.fresh, sizeof before) == 0);
        CHECK_EQ_INT(dev2.state, PD_STATE_IDLE);
        CHECK_EQ_INT(STORE.calls, calls + 1);
    }
    STORE.fail = 0;
    /* The ledger keeps at most PD_LEDGER_SIZE entries. */
    for (int i = 0; i < PD_LEDGER_SIZE + 5; i++) {
        NOW = iat + 10 + i;
        bl = grant(&dev2, e, NOW, 100 + i, 0, blob, sizeof blob);
        CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_OK);
    }
    CHECK_EQ_INT(dev2.fresh.count, PD_LEDGER_SIZE);
    /* A storage failure with a full ledger: the evicted entry comes back. */
    STORE.fail = 1;
    {
        pd_freshness_t before = dev2.fresh;
        NOW += 1;
        bl = grant(&dev2, e, NOW, 250, 0, blob, sizeof blob);
        CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_STORAGE_FAILED);
        CHECK(memcmp(&before, &dev2.fresh, sizeof before) == 0);
    }
    STORE.fail = 0;
    /* Connecting: busy. */
    {
        uint8_t z[32], k[64], nonce[12] = {1}, msg[200];
        const char *plain = "{\"ssid\":\"x\",\"password\":\"\",\"security\":\"open\"}";
        NOW = iat + 100;
        bl = grant(&dev2, e, NOW, 9, 0, blob, sizeof blob);
        CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_OK);
        pd_x25519(e, dev2.public_key, z, pd_test_random, NULL);
        pd_session_keys(z, blob, bl, k);
        memcpy(msg, nonce, 12);
        pd_gcm_seal(k, nonce, "provisiond wifi-credential v1", (const uint8_t *)plain, strlen(plain), msg + 12);
        CHECK_EQ_INT(pd_receive_credentials(&dev2, msg, 12 + strlen(plain) + 16, &creds), PD_OK);
        CHECK(strcmp(creds.security, "open") == 0 && creds.password[0] == 0);
        bl = grant(&dev2, e, iat + 101, 10, 0, blob, sizeof blob);
        CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_BUSY);
        CHECK_EQ_INT(pd_finish(&dev2, 1, NULL, out, sizeof out, &ol), PD_OK);
        CHECK(dev2.last_report.connected);
    }
    /* Expiry between grant and credentials. */
    bl = grant(&dev2, e, NOW + 200, 11, 0, blob, sizeof blob);
    NOW += 200;
    CHECK_EQ_INT(pd_accept_grant(&dev2, blob, bl, NULL), PD_OK);
    NOW += 1000;
    CHECK_EQ_INT(pd_receive_credentials(&dev2, out, 100, &creds), PD_EXPIRED);
    CHECK_EQ_INT(pd_finish(&dev2, 0, NULL, out, sizeof out, &ol), PD_OK);
    CHECK(strcmp(dev2.last_report.reason, "expired") == 0);
    /* No clock, nonce required: a grant without dn is refused; with it, fine. */
    pd_device_deinit(&dev);
    make_device(&dev, 0, 1, NULL);
    bl = grant(&dev, e, 5, 1, 0, blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, bl, NULL), PD_WRONG_NONCE);
    bl = grant(&dev, e, 5, 1, 1, blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, bl, NULL), PD_OK);
    /* An old dn (the nonce was renewed) no longer works. */
    CHECK_EQ_INT(pd_finish(&dev, 0, NULL, out, sizeof out, &ol), PD_OK);
    CHECK(strcmp(dev.last_report.reason, "no_credentials") == 0);
    pd_device_deinit(&dev);
    pd_device_deinit(&dev2);
}

static void bad_credentials(void)
{
    static pd_device_t dev;
    static const char *bad[] = {
        "{\"ssid\":\"lab\",\"password\":\"short\",\"security\":\"wpa2-psk\"}",
        "{\"ssid\":\"\",\"password\":\"long enough\",\"security\":\"wpa2-psk\"}",
        "{\"ssid\":\"lab\",\"password\":\"long enough\",\"security\":\"wep\"}",
        "{\"ssid\":\"lab\",\"password\":\"x\",\"security\":\"open\"}",
        "{\"ssid\":\"lab\",\"password\":\"long enough\",\"security\":\"wpa2-psk\",\"x\":1}",
        "{\"ssid\":\"lab\",\"ssid\":\"lab\",\"password\":\"long enough\",\"security\":\"wpa2-psk\"}",
        "{\"ssid\":\"lab\",\"password\":\"long enough\"}",
        "{\"ssid\":\"123456789012345678901234567890123\",\"password\":\"long enough\",\"security\":\"wpa2-psk\"}",
        "{\"ssid\":\"lab\",\"password\":\"caf\\u00e9 au lait\",\"security\":\"wpa2-psk\"}",
        "{\"ssid\":\"lab\",\"password\":\"long enough\",\"security\":\"wpa2-psk\"",
        "[\"ssid\"]",
    };
    static const char *good[] = {
        "{\"security\":\"wpa2-psk\",\"ssid\":\"lab\",\"password\":\"0123456789abcdef0123456789abcdef0123456789ABCDEF0123456789abcdef\"}",
        "{\"ssid\":\"caf\\u00e9 \\ud83d\\ude00\",\"password\":\"caf\\u00e9\",\"security\":\"wpa3-sae\"}",
        " {\"ssid\" : \"lab\", \"password\":\"\\\"quoted\\\\\", \"security\":\"wpa2-wpa3\"} ",
    };
    uint8_t k[64] = {9}, nonce[12] = {3}, msg[400];
    pd_wifi_credentials_t creds;
    uint8_t out[256];
    size_t ol;
    make_device(&dev, 1, 0, NULL);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0] + sizeof good / sizeof good[0]; i++) {
        int is_bad = i < sizeof bad / sizeof bad[0];
        const char *p = is_bad ? bad[i] : good[i - sizeof bad / sizeof bad[0]];
        CHECK_EQ_INT(pd__install_session_for_test(&dev, k), PD_OK);
        memcpy(msg, nonce, 12);
        pd_gcm_seal(k, nonce, "provisiond wifi-credential v1", (const uint8_t *)p, strlen(p), msg + 12);
        if (is_bad) {
            CHECK_EQ_INT(pd_receive_credentials(&dev, msg, 12 + strlen(p) + 16, &creds), PD_BAD_CREDENTIALS);
        } else {
            int r = pd_receive_credentials(&dev, msg, 12 + strlen(p) + 16, &creds);
            if (r != PD_OK) fprintf(stderr, "refused: %s\n", p);
            CHECK_EQ_INT(r, PD_OK);
        }
        CHECK_EQ_INT(pd_finish(&dev, 0, "x", out, sizeof out, &ol), PD_OK);
    }
    pd_device_deinit(&dev);
}

static void mqtt(void)
{
    char out[256], id[80];
    uint8_t pub[32] = {0};
    pd_activation_t act;
    const char *reply =
        "{\"status\":200,\"body\":{\"deviceId\":7,\"gateway_id\":\"gw-1\",\"heartbeat_interval\":30,"
        "\"grant_verification_keys\":[{\"kty\":\"OKP\",\"crv\":\"Ed25519\",\"x\":\"Ts0VacCjUbMhtYniYYZs-v1cEbwhtuc_S2KS0avO4SI\",\"kid\":\"be5b7499322aa8de\",\"alg\":\"EdDSA\",\"use\":\"sig\"},"
        "{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"xz_k0PO_vw_hmcMLrzHk22VX4GObE8WZRhYkWExjwl4\",\"y\":\"sRCdILBJlrMYcnahUPeJG3uh_hpaTGFtp_4empmB0bU\",\"kid\":\"cf9eb3da5ffe396c\",\"alg\":\"ES256\",\"use\":\"sig\"}]}}";
    CHECK(pd_mqtt_device_topic("pfx", 7, "heartbeat", out, sizeof out) == strlen("pfx/devices/7/heartbeat"));
    CHECK(strcmp(out, "pfx/devices/7/heartbeat") == 0);
    CHECK_EQ_INT(pd_mqtt_device_topic("p+x", 7, "heartbeat", out, sizeof out), 0);
    CHECK(pd_mqtt_activate_topic("pfx", out, sizeof out) > 0 && strcmp(out, "pfx/rpc/device/activate") == 0);
    CHECK(pd_mqtt_activation_request("abcDEF0123456789abcDEF0123456789", 2, pub, "1.0.3", out, sizeof out) > 0);
    CHECK(strcmp(out, "{\"token\":\"abcDEF0123456789abcDEF0123456789\",\"capabilities\":2,"
                      "\"public_key\":\"AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA\",\"firmware_version\":\"1.0.3\"}") == 0);
    CHECK_EQ_INT(pd_mqtt_activation_request("bad\"token", 2, pub, NULL, out, sizeof out), 0);
    CHECK_EQ_INT(pd_mqtt_parse_activation_reply(reply, strlen(reply), &act), 0);
    CHECK(act.status == 200 && act.device_id == 7 && act.heartbeat_interval == 30.0);
    CHECK(strcmp(act.gateway_id, "gw-1") == 0);
    CHECK(act.has_key && act.key.alg == PD_ALG_ES256 && strcmp(act.key.kid, "cf9eb3da5ffe396c") == 0);
    CHECK_EQ_INT(pd_mqtt_parse_activation_reply("{\"status\":410,\"error\":{}}", 25, &act), 0);
    CHECK_EQ_INT(act.status, 410);
    CHECK_EQ_INT(pd_mqtt_parse_activation_reply("nope", 4, &act), -1);
    CHECK(pd_mqtt_heartbeat(30, 12, out, sizeof out) > 0 && strcmp(out, "{\"interval\":30.000,\"uptime\":12}") == 0);
    CHECK_EQ_INT(pd_mqtt_parse_command("{\"id\":\"cmd_1\",\"command\":\"reconfigure\"}", 38, id, sizeof id), 0);
    CHECK(strcmp(id, "cmd_1") == 0);
    CHECK_EQ_INT(pd_mqtt_parse_command("{\"id\":5}", 8, id, sizeof id), -1);
    CHECK(pd_mqtt_command_ack("cmd_1", "ok", out, sizeof out) > 0 && strcmp(out, "{\"id\":\"cmd_1\",\"result\":\"ok\"}") == 0);
    {
        pd_report_t r;
        memset(&r, 0, sizeof r);
        CHECK_EQ_INT(pd_mqtt_wifi_status(&r, out, sizeof out), 0);
        r.valid = 1;
        strcpy(r.grant_id, "AAECAwQFBgcICQoLDA0ODw");
        strcpy(r.reason, "wrong_password");
        CHECK(pd_mqtt_wifi_status(&r, out, sizeof out) > 0);
        CHECK(strcmp(out, "{\"grant_id\":\"AAECAwQFBgcICQoLDA0ODw\",\"state\":\"failed\",\"reason\":\"wrong_password\"}") == 0);
        r.connected = 1;
        CHECK(pd_mqtt_wifi_status(&r, out, sizeof out) > 0);
        CHECK(strcmp(out, "{\"grant_id\":\"AAECAwQFBgcICQoLDA0ODw\",\"state\":\"connected\",\"reason\":null}") == 0);
    }
}

static void codec(void)
{
    uint8_t out[8];
    size_t n;
    char text[16];
    CHECK(pd_b64url_decode("AAE", 3, out, sizeof out, &n) == 0 && n == 2);
    CHECK(pd_b64url_decode("AAF", 3, out, sizeof out, &n) == -1); /* non-canonical */
    CHECK(pd_b64url_decode("AA==", 4, out, sizeof out, &n) == -1);
    CHECK(pd_b64url_decode("A+/A", 4, out, sizeof out, &n) == -1);
    CHECK(pd_b64url_decode("A", 1, out, sizeof out, &n) == -1);
    CHECK(pd_b64url_encode((const uint8_t *)"\xfb\xff", 2, text, sizeof text) == 3 && strcmp(text, "-_8") == 0);
    CHECK(!pd_utf8_valid((const uint8_t *)"\xc0\x80", 2));
    CHECK(!pd_utf8_valid((const uint8_t *)"\xed\xa0\x80", 3));
    {
        pd_json_span_t d;
        const char *deep = "[[[[[[[[[[1]]]]]]]]]]";
        CHECK(pd_json_parse(deep, strlen(deep), &d) == -1);
        CHECK(pd_json_parse("{\"a\":1} x", 9, &d) == -1);
        CHECK(pd_json_parse("{\"a\":01}", 8, &d) == -1);
        CHECK(pd_json_parse("{\"a\":\"\\x\"}", 10, &d) == -1);
        CHECK(pd_json_parse("{\"a\":1,}", 8, &d) == -1);
    }
}

int main(void)
{
    codec();
    framing();
    gatt_upload(23, "correct horse", "\"state\":\"connected\"");
    gatt_upload(517, "wrong password", "\"reason\":\"wrong_password\",\"state\":\"failed\"");
    gatt_upload(185, "correct horse", "\"state\":\"connected\"");
    freshness();
    bad_credentials();
    mqtt();
    return pd_test_done("test_units");
}
