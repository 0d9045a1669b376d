/* A bounded, reproducible fuzz (fixed seed, fixed count) of everything that
 * parses bytes from the air or the broker: grants, GATT frames, credential
 * messages, JSON, base64url, MQTT replies and commands. Run under ASan and
 * UBSan by CTest; here it checks the invariants that must hold for any input. */
#include <string.h>

#include "pd_crypto.h"
#include "pd_gatt.h"
#include "pd_internal.h"
#include "pd_mqtt.h"
#include "pd_test.h"

static uint64_t rng_state;

static uint64_t next(void)
{
    /* xorshift64*: deterministic, so a failing seed reproduces anywhere. */
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

static size_t below(size_t n)
{
    return n ? (size_t)(next() % n) : 0;
}

static int det_random(void *ctx, uint8_t *buf, size_t len)
{
    (void)ctx;
    for (size_t i = 0; i < len; i++) buf[i] = (uint8_t)next();
    return 0;
}

static const char ALPHABET[] = "AZaz09-_.{}\":,[]\\u eyJ0123";

/* One random edit of buf (len in/out, capacity cap). */
static void mutate(uint8_t *buf, size_t *len, size_t cap, int text)
{
    size_t n = *len, at = below(n + 1), k;
    switch (below(6)) {
    case 0: /* overwrite a byte */
        if (n) buf[below(n)] = text ? (uint8_t)ALPHABET[below(sizeof ALPHABET - 1)] : (uint8_t)next();
        break;
    case 1: /* delete a range */
        k = below(n - at + 1);
        memmove(buf + at, buf + at + k, n - at - k);
        *len = n - k;
        break;
    case 2: /* insert bytes */
        k = 1 + below(8);
        if (n + k <= cap) {
            memmove(buf + at + k, buf + at, n - at);
            for (size_t i = 0; i < k; i++) {
                buf[at + i] = text ? (uint8_t)ALPHABET[below(sizeof ALPHABET - 1)] : (uint8_t)next();
            }
            *len = n + k;
        }
        break;
    case 3: /* truncate */
        *len = at;
        break;
    case 4: /* duplicate a range */
        k = below(n - at + 1);
        if (n + k <= cap) {
            memmove(buf + at + k, buf + at, n - at);
            *len = n + k;
        }
        break;
    default: /* flip a bit */
        if (n) buf[below(n)] ^= (uint8_t)(1u << below(8));
        break;
    }
}

static const uint8_t HS_KEY[32] = {42};
static int64_t NOW = 1750000060;

static void device(pd_device_t *dev, const pd_key_t *key)
{
    pd_config_t cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.device_id = 42;
    cfg.capabilities = 2;
    cfg.private_key[0] = 1;
    cfg.has_clock = 1;
    cfg.leeway = 30;
    cfg.now = pd_test_now;
    cfg.random = det_random;
    cfg.ctx = &NOW;
    CHECK_EQ_INT(pd_device_init(dev, &cfg, key, NULL), PD_OK);
}

static void fuzz_grants(pd_device_t *dev, const char *orig, size_t orig_len, long iterations)
{
    static uint8_t buf[PD_MAX_GRANT_LEN + 64];
    long tried = 0;
    for (long i = 0; i < iterations; i++) {
        size_t len = orig_len;
        pd_freshness_t before = dev->fresh;
        int r, edits = 1 + (int)below(3);
        memcpy(buf, orig, orig_len);
        while (edits--) mutate(buf, &len, sizeof buf, 1);
        if (len == orig_len && memcmp(buf, orig, len) == 0) {
            continue; /* an edit that changed nothing */
        }
        tried++;
        r = pd_accept_grant(dev, (const char *)buf, len, NULL);
        /* Only the untouched grant could pass: anything else is a forgery. */
        CHECK(r != PD_OK);
        if (r == PD_OK) {
            return;
        }
        CHECK(r > PD_OK && r <= PD_BUSY);
        CHECK(dev->state == PD_STATE_IDLE);
        CHECK(memcmp(&before.ledger, &dev->fresh.ledger, sizeof before.ledger) == 0 ||
              dev->fresh.count < before.count);
    }
    printf("grants: %ld mutated grants refused\n", tried);
    /* Then the untouched one is accepted: the device was able to say yes. */
    CHECK_EQ_INT(pd_accept_grant(dev, orig, orig_len, NULL), PD_OK);
}

static void fuzz_frames(pd_device_t *dev, long iterations)
{
    static pd_gatt_t g;
    uint8_t frame[600];
    pd_gatt_result_t res;
    pd_wifi_credentials_t creds;
    pd_gatt_init(&g, dev);
    for (long i = 0; i < iterations; i++) {
        size_t len = below(sizeof frame);
        for (size_t k = 0; k < len; k++) frame[k] = (uint8_t)next();
        if (len && below(4)) frame[0] = (uint8_t)(1 + below(3));
        if (len > 2 && below(2)) {
            /* Often the right offset, so values grow and commits happen. */
            size_t off = below(2) ? g.grant_rx.len : g.cred_rx.len;
            frame[1] = (uint8_t)off;
            frame[2] = (uint8_t)(off >> 8);
        }
        if (below(2)) pd_gatt_write_grant(&g, frame, len, &res);
        else pd_gatt_write_credential(&g, frame, len, &creds, &res);
        CHECK(res.att_error == 0 || (res.att_error >= PD_ERR_BAD_OFFSET && res.att_error <= PD_ERR_DIGEST));
        CHECK(res.status_len <= sizeof res.status);
        CHECK(g.grant_rx.len <= PD_MAX_GRANT_LEN && g.cred_rx.len <= PD_MAX_CREDENTIAL_LEN);
        if (below(64) == 0) pd_gatt_disconnected(&g);
    }
}

static void fuzz_credentials(pd_device_t *dev, long iterations)
{
    static const char *seeds[] = {
        "{\"ssid\":\"provisiond-lab\",\"password\":\"correct horse battery staple\",\"security\":\"wpa2-psk\"}",
        "{\"ssid\":\"caf\\u00e9\",\"password\":\"\",\"security\":\"open\"}",
        "{\"security\":\"wpa3-sae\",\"ssid\":\"x\",\"password\":\"\\ud83d\\ude00\"}",
    };
    uint8_t k[64], nonce[12], plain[400], msg[500], out[256];
    pd_wifi_credentials_t creds;
    size_t ol;
    long outcomes[3] = {0, 0, 0};
    det_random(NULL, k, sizeof k);
    for (long i = 0; i < iterations; i++) {
        const char *s = seeds[below(3)];
        size_t len = strlen(s);
        int r, raw = below(8) == 0;
        memcpy(plain, s, len);
        for (int e = (int)below(4); e > 0; e--) mutate(plain, &len, 300, 1);
        pd__install_session_for_test(dev, k);
        det_random(NULL, nonce, sizeof nonce);
        memcpy(msg, nonce, 12);
        pd_gcm_seal(k, nonce, "provisiond wifi-credential v1", plain, len, msg + 12);
        if (raw) mutate(msg, &len, sizeof msg - 28, 0);
        r = pd_receive_credentials(dev, msg, len + 28, &creds);
        CHECK(r == PD_OK || r == PD_BAD_CREDENTIALS || r == PD_DECRYPT_FAILED);
        outcomes[r == PD_OK ? 0 : r == PD_BAD_CREDENTIALS ? 1 : 2]++;
        if (r == PD_OK) {
            CHECK(creds.ssid_len >= 1 && creds.ssid_len <= PD_MAX_SSID_LEN);
            CHECK(strlen(creds.password) <= PD_MAX_PASSWORD_LEN);
            CHECK(pd_utf8_valid((const uint8_t *)creds.ssid, creds.ssid_len));
        }
        CHECK_EQ_INT(pd_finish(dev, r == PD_OK, NULL, out, sizeof out, &ol), PD_OK);
    }
    printf("credentials: %ld accepted, %ld bad_credentials, %ld decrypt_failed\n", outcomes[0],
           outcomes[1], outcomes[2]);
    /* Every path was reached, or the mutations are not doing their job. */
    CHECK(outcomes[0] > 0 && outcomes[1] > 0 && outcomes[2] > 0);
}

static void fuzz_text(const char *vectors, size_t vlen, long iterations)
{
    static const char *seeds[] = {
        "{\"status\":200,\"body\":{\"deviceId\":7,\"gateway_id\":\"gw\",\"heartbeat_interval\":30.5,"
        "\"grant_verification_keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"xz_k0PO_vw_hmcMLrzHk22VX4GObE8WZRhYkWExjwl4\","
        "\"y\":\"sRCdILBJlrMYcnahUPeJG3uh_hpaTGFtp_4empmB0bU\",\"kid\":\"cf9eb3da5ffe396c\",\"alg\":\"ES256\",\"use\":\"sig\"}]}}",
        "{\"id\":\"cmd_1\",\"command\":\"reconfigure\",\"issued_at\":\"2026-01-01T00:00:00Z\"}",
        "{\"kty\":\"oct\",\"k\":\"AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8\",\"kid\":\"hs256-dev-42\",\"alg\":\"HS256\"}",
    };
    static uint8_t buf[4096];
    char str[64], id[65];
    for (long i = 0; i < iterations; i++) {
        size_t len, which = below(4);
        pd_json_span_t doc, k, v;
        const char *pos = NULL;
        pd_activation_t act;
        pd_key_t key;
        uint8_t bin[64];
        size_t bl;
        int64_t iv;
        double dv;
        if (which == 3) {
            /* A window of the vector file: real JSON, cut anywhere. */
            size_t at = below(vlen), n = below(sizeof buf < vlen - at ? sizeof buf : vlen - at);
            memcpy(buf, vectors + at, n);
            len = n;
        } else {
            len = strlen(seeds[which]);
            memcpy(buf, seeds[which], len);
        }
        for (int e = (int)below(4); e > 0; e--) mutate(buf, &len, sizeof buf, 1);
        if (pd_json_parse((const char *)buf, len, &doc) == 0 && pd_json_type(doc) == PD_JSON_OBJECT) {
            pd_json_keys_unique(doc);
            while (pd_json_next_member(doc, &pos, &k, &v) == 1) {
                pd_json_string(v, str, sizeof str, NULL);
                pd_json_int(v, &iv);
                pd_json_number(v, &dv);
                pd_json_key_is(k, "id");
            }
        }
        pd_mqtt_parse_activation_reply((const char *)buf, len, &act);
        if (pd_mqtt_parse_command((const char *)buf, len, id, sizeof id) == 0) {
            CHECK(strlen(id) <= PD_MAX_COMMAND_ID_LEN);
        }
        pd_key_from_jwk(&key, (const char *)buf, len);
        if (pd_b64url_decode((const char *)buf, len < 80 ? len : 80, bin, sizeof bin, &bl) == 0) {
            char back[128];
            /* Canonical: decoding then encoding gives the same text back. */
            if (bl) CHECK(pd_b64url_encode(bin, bl, back, sizeof back) == (len < 80 ? len : 80) &&
                          memcmp(back, buf, len < 80 ? len : 80) == 0);
        }
        pd_utf8_valid(buf, len);
    }
}

int main(int argc, char **argv)
{
    static pd_device_t dev;
    pd_key_t key;
    char *vectors, jwk[200], b64[64], blob[2100], claims[400];
    size_t vlen, bl;
    long iterations;
    pd_json_span_t v, jwk_span;
    if (argc < 4 || !(vectors = pd_test_read_file(argv[1], &vlen))) {
        fprintf(stderr, "usage: test_fuzz wifi-grant-v1.json ITERATIONS SEED\n");
        return 2;
    }
    iterations = atol(argv[2]);
    rng_state = 0x9E3779B97F4A7C15ULL ^ (uint64_t)atoll(argv[3]);
    if (pd_json_parse(vectors, vlen, &v) != 0) return 2;

    /* HS256: cheap to verify, so most grant mutations go here. */
    pd_b64url_encode(HS_KEY, 32, b64, sizeof b64);
    snprintf(jwk, sizeof jwk, "{\"kty\":\"oct\",\"k\":\"%s\",\"kid\":\"hs256-dev-42\",\"alg\":\"HS256\"}", b64);
    CHECK_EQ_INT(pd_key_from_jwk(&key, jwk, strlen(jwk)), PD_OK);
    device(&dev, &key);
    snprintf(claims, sizeof claims,
             "{\"iss\":\"gw\",\"sub\":\"42\",\"aud\":\"wifi-config\",\"iat\":1750000000,\"exp\":1750000900,"
             "\"jti\":\"AAECAwQFBgcICQoLDA0ODw\",\"cap\":2,\"epk\":\"%s\"}",
             pd_test_str(v, "grant.claims.epk", b64, sizeof b64));
    bl = pd_test_hs256_grant(HS_KEY, 32, "hs256-dev-42", claims, blob, sizeof blob);
    fuzz_grants(&dev, blob, bl, iterations);
    pd_device_deinit(&dev);

    /* ES256, the vector's grant: fewer rounds, each costs a verification. */
    CHECK(pd_test_get(v, "es256.gateway_jwk", &jwk_span) == 0);
    CHECK_EQ_INT(pd_key_from_jwk(&key, jwk_span.start, (size_t)(jwk_span.end - jwk_span.start)), PD_OK);
    device(&dev, &key);
    {
        uint8_t nonce[16];
        pd_test_hex_at(v, "device.nonce", nonce, sizeof nonce);
        pd_device_set_nonce(&dev, nonce);
    }
    pd_test_str(v, "es256.blob", blob, sizeof blob);
    fuzz_grants(&dev, blob, strlen(blob), iterations / 100);

    fuzz_frames(&dev, iterations);
    fuzz_credentials(&dev, iterations / 2);
    fuzz_text(vectors, vlen, iterations);
    pd_device_deinit(&dev);
    free(vectors);
    printf("test_fuzz: %ld iterations, seed %s\n", iterations, argv[3]);
    return pd_test_done("test_fuzz");
}
