/* Every test vector of tests/vectors/wifi-grant-v1.json that a device on
 * this library can check (docs/wifi-crypto.md §7). The EdDSA grant itself
 * cannot be verified here (mbedTLS 2.x has no Ed25519): its key agreement,
 * key schedule, credential message and statuses are still checked, and the
 * same checks run on the ES256 and HS256 grants end to end. */
#include <string.h>

#include "pd_crypto.h"
#include "pd_internal.h"
#include "pd_test.h"

static pd_json_span_t V;
static char S[4096];

static void device_for(pd_device_t *dev, const pd_key_t *key, int64_t *now, uint32_t id,
                       const char *nonce_path, int64_t leeway)
{
    pd_config_t cfg;
    uint8_t nonce[16];
    memset(&cfg, 0, sizeof cfg);
    cfg.device_id = id;
    cfg.capabilities = PD_CAP_WIFI_UPLOAD;
    pd_test_hex_at(V, "keys.device_x25519_private", cfg.private_key, 32);
    cfg.has_clock = 1;
    cfg.leeway = leeway;
    cfg.now = pd_test_now;
    cfg.random = pd_test_random;
    cfg.ctx = now;
    CHECK_EQ_INT(pd_device_init(dev, &cfg, key, NULL), PD_OK);
    CHECK_EQ_INT(pd_test_hex_at(V, nonce_path, nonce, sizeof nonce), 16);
    pd_device_set_nonce(dev, nonce);
}

static void pin(const char *path, pd_key_t *key, int expect)
{
    pd_json_span_t jwk;
    CHECK(pd_test_get(V, path, &jwk) == 0);
    CHECK_EQ_INT(pd_key_from_jwk(key, jwk.start, (size_t)(jwk.end - jwk.start)), expect);
}

static void key_schedule(void)
{
    uint8_t priv[32], pub[32], want[64], epk[32], z[32], k[64], salt[32];
    char blob[2100];
    size_t n;
    pd_test_hex_at(V, "keys.device_x25519_private", priv, 32);
    CHECK(pd_x25519_base(priv, pub, pd_test_random, NULL) == 0);
    pd_test_hex_at(V, "keys.device_x25519_public", want, 32);
    CHECK(memcmp(pub, want, 32) == 0);

    pd_test_str(V, "grant.claims.epk", S, sizeof S);
    CHECK(pd_b64url_decode(S, strlen(S), epk, sizeof epk, &n) == 0 && n == 32);
    pd_test_hex_at(V, "keys.ephemeral_x25519_public", want, 32);
    CHECK(memcmp(epk, want, 32) == 0);
    CHECK(pd_x25519(priv, epk, z, pd_test_random, NULL) == 0);
    pd_test_hex_at(V, "grant.z", want, 32);
    CHECK(memcmp(z, want, 32) == 0);
    /* The uploader's side gives the same Z. */
    pd_test_hex_at(V, "keys.ephemeral_x25519_private", priv, 32);
    pd_test_hex_at(V, "keys.device_x25519_public", pub, 32);
    CHECK(pd_x25519(priv, pub, k, pd_test_random, NULL) == 0 && memcmp(k, z, 32) == 0);

    pd_test_str(V, "grant.blob", blob, sizeof blob);
    pd_sha256((const uint8_t *)blob, strlen(blob), salt);
    pd_test_hex_at(V, "grant.salt_sha256_of_blob", want, 32);
    CHECK(memcmp(salt, want, 32) == 0);
    CHECK(pd_session_keys(z, blob, strlen(blob), k) == PD_OK);
    pd_test_hex_at(V, "grant.k_session", want, 64);
    CHECK(memcmp(k, want, 64) == 0);
    pd_test_hex_at(V, "grant.k_up", want, 32);
    CHECK(memcmp(k, want, 32) == 0);
    pd_test_hex_at(V, "grant.k_down", want, 32);
    CHECK(memcmp(k + 32, want, 32) == 0);

    /* HS256 per-device key: HKDF(master, no salt, info). */
    pd_test_hex_at(V, "hs256.master_secret", priv, 32);
    pd_test_str(V, "hs256.info", S, sizeof S);
    CHECK(pd_hkdf_sha256(NULL, 0, priv, 32, S, k, 32) == 0);
    pd_test_hex_at(V, "hs256.device_key", want, 32);
    CHECK(memcmp(k, want, 32) == 0);

    /* A low-order epk: no Z. */
    memset(epk, 0, sizeof epk);
    CHECK(pd_x25519(priv, epk, z, pd_test_random, NULL) == PD_X25519_LOW_ORDER);
}

static void eddsa_is_refused_at_pinning(void)
{
    pd_key_t key;
    /* Documented limitation: this library needs an ES256 or HS256 gateway. */
    pin("keys.gateway_jwk", &key, PD_ALG_NOT_ALLOWED);
}

static void credential_and_status(void)
{
    pd_key_t key;
    pd_device_t dev;
    pd_wifi_credentials_t creds;
    int64_t now = pd_test_int(V, "grant.claims.iat") + 60;
    uint8_t k[64], msg[1100], out[256], want[256];
    char jti[32], field[128];
    long n;
    size_t olen;

    pin("es256.gateway_jwk", &key, PD_OK);
    device_for(&dev, &key, &now, 42, "device.nonce", 30);
    pd_test_hex_at(V, "grant.k_session", k, 64);
    pd_test_str(V, "grant.claims.jti", jti, sizeof jti);
    CHECK(pd__install_session(&dev, jti, pd_test_int(V, "grant.claims.exp"), k) == PD_OK);
    n = pd_test_hex_at(V, "credential.message", msg, sizeof msg);
    CHECK(n > 0);
    CHECK_EQ_INT(pd_receive_credentials(&dev, msg, (size_t)n, &creds), PD_OK);
    CHECK(strcmp(creds.ssid, pd_test_str(V, "credential.ssid", field, sizeof field)) == 0);
    CHECK(strcmp(creds.password, pd_test_str(V, "credential.password", field, sizeof field)) == 0);
    CHECK(strcmp(creds.security, pd_test_str(V, "credential.security", field, sizeof field)) == 0);
    CHECK_EQ_INT(dev.state, PD_STATE_CONNECTING);
    /* One message per grant. */
    CHECK_EQ_INT(pd_receive_credentials(&dev, msg, (size_t)n, &creds), PD_ALREADY_USED);

    /* Byte for byte: counter nonce, fixed key, sorted JSON. */
    CHECK_EQ_INT(pd_test_int(V, "status.0.counter"), 0);
    CHECK_EQ_INT(pd_status_message(&dev, NULL, out, sizeof out, &olen), PD_OK);
    n = pd_test_hex_at(V, "status.0.message", want, sizeof want);
    CHECK((long)olen == n && memcmp(out, want, olen) == 0);
    CHECK_EQ_INT(pd_test_int(V, "status.1.counter"), 1);
    CHECK_EQ_INT(pd_finish(&dev, 0, "wrong_password", out, sizeof out, &olen), PD_OK);
    n = pd_test_hex_at(V, "status.1.message", want, sizeof want);
    CHECK((long)olen == n && memcmp(out, want, olen) == 0);
    CHECK(dev.last_report.valid && !dev.last_report.connected);
    CHECK(strcmp(dev.last_report.reason, "wrong_password") == 0);
    CHECK(strcmp(dev.last_report.grant_id, jti) == 0);
    CHECK_EQ_INT(dev.state, PD_STATE_IDLE);
    pd_device_deinit(&dev);
}

static void accept(const char *jwk_path, const char *blob_path, const char *k_path)
{
    pd_key_t key;
    pd_device_t dev;
    pd_grant_info_t info;
    int64_t now = pd_test_int(V, "grant.claims.iat") + 60;
    char blob[2100], jti[32];
    uint8_t want[64], nonce_before[16], plain[128], out[256];
    size_t olen;

    pin(jwk_path, &key, PD_OK);
    device_for(&dev, &key, &now, (uint32_t)pd_test_int(V, "device.device_id"), "device.nonce", 30);
    memcpy(nonce_before, dev.nonce, 16);
    pd_test_str(V, blob_path, blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, strlen(blob), &info), PD_OK);
    pd_test_hex_at(V, k_path, want, 64);
    CHECK(memcmp(dev.session.k_up, want, 32) == 0 && memcmp(dev.session.k_down, want + 32, 32) == 0);
    CHECK(strcmp(info.jti, pd_test_str(V, "grant.claims.jti", jti, sizeof jti)) == 0);
    CHECK_EQ_INT(info.iat, pd_test_int(V, "grant.claims.iat"));
    CHECK_EQ_INT(dev.state, PD_STATE_GRANT_ACCEPTED);
    CHECK(memcmp(dev.nonce, nonce_before, 16) != 0); /* renewed */
    CHECK_EQ_INT(dev.fresh.count, 1);
    CHECK(dev.fresh.has_last_iat && dev.fresh.last_iat == info.iat);
    /* The first sealed status is grant-accepted with counter 0 (wifi-crypto.md §4.2). */
    CHECK_EQ_INT(pd_status_message(&dev, NULL, out, sizeof out, &olen), PD_OK);
    {
        uint8_t zero_nonce[12] = {0};
        char expect[96];
        snprintf(expect, sizeof expect, "{\"grant_id\":\"%s\",\"state\":\"grant-accepted\"}", jti);
        CHECK(pd_gcm_open(want + 32, zero_nonce, "provisiond wifi-status v1", out, olen, plain) == 0);
        CHECK(olen - 16 == strlen(expect) && memcmp(plain, expect, olen - 16) == 0);
    }
    /* The same grant again: replayed. */
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, strlen(blob), NULL), PD_REPLAYED);
    pd_device_deinit(&dev);
}

static void rejects(const char *base)
{
    pd_json_span_t cases, c;
    const char *pos = NULL;
    char path[96], name[64], reason[64], blob[2100];
    int count = 0;
    int64_t now;
    snprintf(path, sizeof path, "%s.device_context.now", base);
    now = pd_test_int(V, path);
    snprintf(path, sizeof path, "%s.cases", base);
    CHECK(pd_test_get(V, path, &cases) == 0);
    while (pd_json_next_element(cases, &pos, &c) == 1) {
        pd_key_t key;
        pd_device_t dev;
        pd_freshness_t before;
        uint8_t nonce[16];
        int r;
        char ctx[96];
        snprintf(ctx, sizeof ctx, "%s.device_context.pinned.0", base);
        pin(ctx, &key, PD_OK);
        snprintf(ctx, sizeof ctx, "%s.device_context.nonce", base);
        snprintf(path, sizeof path, "%s.device_context.leeway", base);
        {
            char idp[96];
            snprintf(idp, sizeof idp, "%s.device_context.device_id", base);
            device_for(&dev, &key, &now, (uint32_t)pd_test_int(V, idp), ctx, pd_test_int(V, path));
        }
        memcpy(nonce, dev.nonce, 16);
        before = dev.fresh;
        pd_test_str(c, "name", name, sizeof name);
        pd_test_str(c, "reason", reason, sizeof reason);
        pd_test_str(c, "blob", blob, sizeof blob);
        r = pd_accept_grant(&dev, blob, strlen(blob), NULL);
        if (strcmp(pd_reason_str(r), reason) != 0) {
            fprintf(stderr, "%s/%s: got %s, expected %s\n", base, name, pd_reason_str(r), reason);
            pd_test_failures++;
        }
        /* A refused grant leaves no trace. */
        CHECK_EQ_INT(dev.state, PD_STATE_IDLE);
        CHECK(memcmp(&before, &dev.fresh, sizeof before) == 0);
        CHECK(memcmp(nonce, dev.nonce, 16) == 0);
        pd_device_deinit(&dev);
        count++;
    }
    printf("%s: %d reject cases\n", base, count);
    CHECK(count >= 10);
}

static void hs256(void)
{
    char jwk[256], b64[64], kid[64];
    uint8_t dk[32];
    pd_key_t key;
    pd_device_t dev;
    int64_t now = pd_test_int(V, "grant.claims.iat") + 60;
    char blob[2100];
    uint8_t want[64];
    pd_test_hex_at(V, "hs256.device_key", dk, 32);
    pd_b64url_encode(dk, 32, b64, sizeof b64);
    snprintf(jwk, sizeof jwk, "{\"kty\":\"oct\",\"k\":\"%s\",\"kid\":\"%s\",\"alg\":\"HS256\"}", b64,
             pd_test_str(V, "hs256.kid", kid, sizeof kid));
    CHECK_EQ_INT(pd_key_from_jwk(&key, jwk, strlen(jwk)), PD_OK);
    device_for(&dev, &key, &now, 42, "device.nonce", 30);
    pd_test_str(V, "hs256.blob", blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, strlen(blob), NULL), PD_OK);
    pd_test_hex_at(V, "hs256.k_session", want, 64);
    CHECK(memcmp(dev.session.k_up, want, 32) == 0 && memcmp(dev.session.k_down, want + 32, 32) == 0);
    pd_device_deinit(&dev);
    /* The ES256 grant is refused by an HS256 device before any signature work. */
    device_for(&dev, &key, &now, 42, "device.nonce", 30);
    pd_test_str(V, "es256.blob", blob, sizeof blob);
    CHECK_EQ_INT(pd_accept_grant(&dev, blob, strlen(blob), NULL), PD_ALG_NOT_ALLOWED);
    pd_device_deinit(&dev);
}

int main(int argc, char **argv)
{
    size_t len;
    char *text;
    char ver[64];
    if (argc < 2 || !(text = pd_test_read_file(argv[1], &len))) {
        fprintf(stderr, "usage: test_vectors wifi-grant-v1.json\n");
        return 2;
    }
    if (pd_json_parse(text, len, &V) != 0) {
        fprintf(stderr, "vector file does not parse\n");
        return 2;
    }
    CHECK(strcmp(pd_test_str(V, "version", ver, sizeof ver), "provisiond wifi-grant v1") == 0);
    key_schedule();
    eddsa_is_refused_at_pinning();
    credential_and_status();
    accept("es256.gateway_jwk", "es256.blob", "es256.k_session");
    hs256();
    rejects("es256.rejects");
    free(text);
    return pd_test_done("test_vectors");
}
