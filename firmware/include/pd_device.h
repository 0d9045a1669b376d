/* The device's side of a provisiond WiFi credential upload (docs/wifi-crypto.md):
 * grant verification, freshness, session keys, the credential message and
 * sealed statuses. It mirrors the Python reference device
 * (`ReferenceDevice`) call for call, so the simulator can run either.
 *
 * Memory: everything lives in pd_device_t, which the firmware places where
 * it likes (static storage is the intent). The library never allocates;
 * mbedTLS allocates bignums during ECDSA and X25519 and frees them before
 * returning (see firmware/README.md for the figures).
 *
 * Algorithms: ES256 and HS256. mbedTLS 2.x has no Ed25519, so a gateway
 * serving devices on this library signs with `[wifi] signing_algorithm =
 * "ES256"` (or HS256). An EdDSA key cannot be pinned: pd_key_from_jwk
 * refuses it. */
#ifndef PD_DEVICE_H
#define PD_DEVICE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define PD_MAX_GRANT_LEN 2048      /* characters of a compact JWS */
#define PD_MAX_CREDENTIAL_LEN 1024 /* bytes of a credential message */
#define PD_MAX_STATUS_LEN 192      /* bytes of one sealed status (plaintext + 16) */
#define PD_LEDGER_SIZE 32          /* remembered jtis, as in the reference */
#define PD_NONCE_LEN 16
#define PD_JTI_LEN 16
#define PD_KEY_LEN 32
#define PD_MAX_KID_LEN 40
#define PD_MAX_REASON_LEN 64
#define PD_MAX_SSID_LEN 32
#define PD_MAX_PASSWORD_LEN 128
#define PD_DEVICE_INFO_LEN 160 /* Device Info JSON, NUL included */
#define PD_MAX_GRANT_LIFETIME 3600
#define PD_DEFAULT_LEEWAY 30
#define PD_CAP_WIFI_UPLOAD 0x02

/* Results. 0 is success; the others are the reference's reason codes
 * (pd_reason_str gives the wire spelling). */
typedef enum {
    PD_OK = 0,
    PD_MALFORMED,
    PD_ALG_NOT_ALLOWED,
    PD_UNKNOWN_KID,
    PD_BAD_SIGNATURE,
    PD_WRONG_AUDIENCE,
    PD_WRONG_SUBJECT,
    PD_MISSING_CAP,
    PD_EXPIRED,
    PD_NOT_YET_VALID,
    PD_REPLAYED,
    PD_STALE_IAT,
    PD_WRONG_NONCE,
    PD_BUSY,
    PD_STORAGE_FAILED, /* the persist callback failed: nothing was committed */
    PD_NO_GRANT,
    PD_ALREADY_USED,
    PD_DECRYPT_FAILED,
    PD_BAD_CREDENTIALS,
    PD_BAD_ARGUMENT, /* caller error: buffer too small, bad reason code, ... */
    PD_CRYPTO_ERROR  /* mbedTLS failed (out of memory, RNG) */
} pd_result_t;

const char *pd_reason_str(int result);

typedef enum { PD_ALG_NONE = 0, PD_ALG_ES256, PD_ALG_HS256 } pd_alg_t;

/* The pinned grant-verification key (from the activation reply). */
typedef struct {
    pd_alg_t alg;
    char kid[PD_MAX_KID_LEN + 1];
    uint8_t p256[65];  /* ES256: uncompressed point, checked on the curve */
    uint8_t hs256[64]; /* HS256: the device's own secret key */
    size_t hs256_len;
} pd_key_t;

/* One JWK object as JSON text. EdDSA keys give PD_ALG_NOT_ALLOWED. */
int pd_key_from_jwk(pd_key_t *key, const char *json, size_t len);

typedef enum {
    PD_STATE_IDLE = 0,
    PD_STATE_GRANT_ACCEPTED,
    PD_STATE_CONNECTING,
    PD_STATE_CONNECTED, /* only ever reported, never held */
    PD_STATE_FAILED
} pd_state_t;

const char *pd_state_str(pd_state_t state);

typedef struct {
    int64_t exp;
    uint8_t jti[PD_JTI_LEN];
} pd_ledger_entry_t;

/* What must survive a reboot (wifi-crypto.md §5). Plain data: the firmware
 * may write the struct as bytes. */
typedef struct {
    int64_t last_iat;
    uint8_t has_last_iat;
    uint8_t count;
    pd_ledger_entry_t ledger[PD_LEDGER_SIZE];
} pd_freshness_t;

typedef struct {
    uint32_t device_id;
    uint32_t capabilities;
    uint8_t private_key[PD_KEY_LEN]; /* X25519 scalar; generated once, kept in flash */
    int has_clock;
    int64_t leeway; /* seconds; PD_DEFAULT_LEEWAY */
    int require_nonce;
    /* Unix seconds. Only called when has_clock. */
    int64_t (*now)(void *ctx);
    /* Fill buf with cryptographically secure random bytes; 0 on success. */
    int (*random)(void *ctx, uint8_t *buf, size_t len);
    /* Store freshness durably before it counts; 0 on success. Called when a
     * grant is accepted, before the caller can act on it. May be NULL (then
     * a reboot reopens the replay window: tests only). */
    int (*persist)(void *ctx, const pd_freshness_t *state);
    void *ctx;
} pd_config_t;

typedef struct {
    char ssid[PD_MAX_SSID_LEN + 1];
    size_t ssid_len; /* an SSID may contain NUL */
    char password[PD_MAX_PASSWORD_LEN + 1];
    char security[12]; /* open, wpa2-psk, wpa2-wpa3, wpa3-sae */
} pd_wifi_credentials_t;

typedef struct {
    char jti[24];
    int64_t iat;
    int64_t exp;
} pd_grant_info_t;

/* The plaintext result for P/devices/N/wifi/status. */
typedef struct {
    int valid;
    int connected;
    char grant_id[24];
    char reason[PD_MAX_REASON_LEN + 1];
} pd_report_t;

typedef struct {
    pd_config_t cfg;
    pd_key_t key;
    pd_state_t state;
    pd_freshness_t fresh;
    uint8_t public_key[PD_KEY_LEN];
    uint8_t nonce[PD_NONCE_LEN];
    /* The session one accepted grant buys. */
    struct {
        int active;
        char jti[24];
        uint8_t jti_raw[PD_JTI_LEN];
        int64_t exp;
        uint8_t k_up[PD_KEY_LEN];
        uint8_t k_down[PD_KEY_LEN];
        uint64_t counter;
        int credentials_used;
        int failure; /* pd_result_t that ended it early, or PD_OK */
    } session;
    pd_report_t last_report;
    /* Decoded grant header and payload, or decrypted credential JSON;
     * wiped right after use. */
    uint8_t scratch[PD_MAX_GRANT_LEN * 3 / 4];
} pd_device_t;

/* `restored`: freshness read back from flash at boot, or NULL for a new device. */
int pd_device_init(pd_device_t *dev, const pd_config_t *cfg, const pd_key_t *pinned,
                   const pd_freshness_t *restored);
/* Wipe every key and session secret. */
void pd_device_deinit(pd_device_t *dev);
/* Only so test vectors can pin the nonce; real devices draw one at init. */
void pd_device_set_nonce(pd_device_t *dev, const uint8_t nonce[PD_NONCE_LEN]);

/* Device Info characteristic: compact JSON with sorted keys. Returns its
 * length (NUL written), or 0 if cap is too small. */
size_t pd_device_info(const pd_device_t *dev, char *out, size_t cap);

/* Verify a grant (wifi-crypto.md §2.1) and open a session. A refusal
 * changes nothing. */
int pd_accept_grant(pd_device_t *dev, const char *blob, size_t len, pd_grant_info_t *info);

/* The one credential message a grant allows. On PD_DECRYPT_FAILED,
 * PD_BAD_CREDENTIALS or PD_EXPIRED the grant is spent and the state is
 * PD_STATE_FAILED: call pd_finish to seal the verdict. */
int pd_receive_credentials(pd_device_t *dev, const uint8_t *msg, size_t len,
                           pd_wifi_credentials_t *out);

/* Seal one status under K_down with the next counter. `reason` may be NULL
 * and must otherwise match [a-z0-9_-]{1,64}. */
int pd_status(pd_device_t *dev, pd_state_t state, const char *reason, uint8_t *out, size_t cap,
              size_t *out_len);
/* The current state (e.g. grant-accepted right after pd_accept_grant). */
int pd_status_message(pd_device_t *dev, const char *reason, uint8_t *out, size_t cap,
                      size_t *out_len);
/* End the attempt: final sealed status, report for MQTT, back to idle with
 * a fresh nonce. reason NULL on failure: the session's own failure, or
 * "no_credentials" / "unknown". */
int pd_finish(pd_device_t *dev, int connected, const char *reason, uint8_t *out, size_t cap,
              size_t *out_len);

void pd_wipe(void *p, size_t n);

/* The X25519 public key for a private key: what activation sends, before
 * any grant key is pinned. */
int pd_public_key(const uint8_t private_key[PD_KEY_LEN], uint8_t public_key[PD_KEY_LEN],
                  int (*random)(void *ctx, uint8_t *buf, size_t len), void *ctx);

/* For bindings (the simulator's ctypes adapter) that should not mirror
 * pd_device_t's layout. */
size_t pd_device_sizeof(void);
size_t pd_config_sizeof(void);
size_t pd_freshness_sizeof(void);
pd_state_t pd_device_state(const pd_device_t *dev);
const uint8_t *pd_device_nonce(const pd_device_t *dev);
const uint8_t *pd_device_public_key(const pd_device_t *dev);
const pd_report_t *pd_device_last_report(const pd_device_t *dev);
const pd_freshness_t *pd_device_freshness(const pd_device_t *dev);

/* K_session = HKDF-SHA256(Z, SHA-256(blob), "provisiond wifi-session v1", 64):
 * K_up is k[0..31], K_down k[32..63]. Public for test vectors and uploaders. */
int pd_session_keys(const uint8_t z[PD_KEY_LEN], const char *blob, size_t len, uint8_t k[64]);

#ifdef __cplusplus
}
#endif
#endif
