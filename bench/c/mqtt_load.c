/* The physical limit of an RPC load driver on this machine: the same closed
 * loop as bench/common.py rpc_load (CONCURRENCY requests in flight, each sent
 * again when its reply arrives), on libmosquitto in one thread.
 *
 * Requests are QoS 1 with a Response Topic, 16 bytes of Correlation Data
 * (8 random bytes for the run, then the request's sequence number) and, if
 * KEY is not "-", an `authorization: Bearer KEY` user property. The first
 * WARMUP requests are not measured. Prints one JSON object:
 * {"n", "seconds", "latencies_ms": [...], "statuses": {...}}.
 *
 *   mqtt_load PORT TOPIC PAYLOAD_FILE KEY N CONCURRENCY WARMUP TIMEOUT_S
 */
#include "bench_client.h"

#include <mosquitto.h>
#include <mqtt_protocol.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char *topic;
static char reply_topic[64];
static char *payload;
static long payload_len;
static char *auth;
static long total, warmup, sent, received, measured;
static int concurrency;
static double *sent_at, *latency;
static double measure_start, last_reply;
static int status_counts[1000];
static unsigned char run_id[8];

static double now(void) {
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void send_one(struct mosquitto *m) {
	long seq = sent++;
	unsigned char corr[16];
	memcpy(corr, run_id, 8);
	for (int i = 0; i < 8; i++) corr[8 + i] = (unsigned char)(((uint64_t)seq) >> (56 - 8 * i));
	mosquitto_property *props = NULL;
	mosquitto_property_add_string(&props, MQTT_PROP_RESPONSE_TOPIC, reply_topic);
	mosquitto_property_add_binary(&props, MQTT_PROP_CORRELATION_DATA, corr, 16);
	if (auth) mosquitto_property_add_string_pair(&props, MQTT_PROP_USER_PROPERTY, "authorization", auth);
	sent_at[seq] = now();
	if (seq == warmup) measure_start = sent_at[seq];
	mosquitto_publish_v5(m, NULL, topic, (int)payload_len, payload, 1, false, props);
	mosquitto_property_free_all(&props);
}

static void on_subscribe(struct mosquitto *m, void *obj, int mid, int count, const int *granted, const mosquitto_property *props) {
	(void)obj; (void)mid; (void)count; (void)granted; (void)props;
	for (int i = 0; i < concurrency && sent < total; i++) send_one(m);
}

static int status_of(const char *body, int len) {
	const char *key = "\"status\":";
	int klen = (int)strlen(key);
	for (int i = 0; i + klen < len; i++) {
		if (memcmp(body + i, key, (size_t)klen) == 0) {
			int s = atoi(body + i + klen);
			return s >= 0 && s < 1000 ? s : 0;
		}
	}
	return 0;
}

static void on_message(struct mosquitto *m, void *obj, const struct mosquitto_message *msg, const mosquitto_property *props) {
	(void)obj;
	void *corr = NULL;
	uint16_t corr_len = 0;
	if (!mosquitto_property_read_binary(props, MQTT_PROP_CORRELATION_DATA, &corr, &corr_len, false)) return;
	if (corr_len != 16 || memcmp(corr, run_id, 8) != 0) {
		free(corr);
		return;
	}
	uint64_t seq = 0;
	for (int i = 0; i < 8; i++) seq = (seq << 8) | ((unsigned char *)corr)[8 + i];
	free(corr);
	if ((long)seq >= sent) return;
	double t = now();
	received++;
	if ((long)seq >= warmup) {
		latency[measured++] = (t - sent_at[seq]) * 1000.0;
		status_counts[status_of(msg->payload, msg->payloadlen)]++;
		last_reply = t;
	}
	if (sent < total) send_one(m);
	else if (received >= total) mosquitto_disconnect_v5(m, 0, NULL);
}

int main(int argc, char **argv) {
	if (argc != 9) {
		fprintf(stderr, "usage: mqtt_load PORT TOPIC PAYLOAD_FILE KEY N CONCURRENCY WARMUP TIMEOUT_S\n");
		return 2;
	}
	topic = argv[2];
	FILE *f = fopen(argv[3], "rb");
	if (!f) { perror("payload"); return 2; }
	fseek(f, 0, SEEK_END);
	payload_len = ftell(f);
	fseek(f, 0, SEEK_SET);
	payload = malloc((size_t)payload_len + 1);
	if (fread(payload, 1, (size_t)payload_len, f) != (size_t)payload_len) { perror("payload"); return 2; }
	fclose(f);
	if (strcmp(argv[4], "-") != 0) {
		auth = malloc(strlen(argv[4]) + 8);
		sprintf(auth, "Bearer %s", argv[4]);
	}
	long n = atol(argv[5]);
	concurrency = atoi(argv[6]);
	warmup = atol(argv[7]);
	total = n + warmup;
	int timeout = atoi(argv[8]);
	sent_at = calloc((size_t)total, sizeof(double));
	latency = calloc((size_t)n, sizeof(double));
	FILE *r = fopen("/dev/urandom", "rb");
	if (!r || fread(run_id, 1, 8, r) != 8) { perror("urandom"); return 2; }
	fclose(r);
	snprintf(reply_topic, sizeof reply_topic, "bench-replies/c-%02x%02x%02x%02x%02x%02x%02x%02x",
	         run_id[0], run_id[1], run_id[2], run_id[3], run_id[4], run_id[5], run_id[6], run_id[7]);

	program = "mqtt_load";
	subscribe_to = reply_topic;
	struct mosquitto *m = bench_connect(argv[1]);
	mosquitto_subscribe_v5_callback_set(m, on_subscribe);
	mosquitto_message_v5_callback_set(m, on_message);
	double deadline = now() + timeout;
	while (received < total) {
		int rc = mosquitto_loop(m, 100, 1);
		if (rc != MOSQ_ERR_SUCCESS && received < total) {
			fprintf(stderr, "mqtt_load: connection lost (%d)\n", rc);
			return 1;
		}
		if (now() > deadline) {
			fprintf(stderr, "mqtt_load: timed out with %ld of %ld replies\n", received, total);
			return 3;
		}
	}
	printf("{\"n\": %ld, \"seconds\": %.6f, \"statuses\": {", measured, last_reply - measure_start);
	int first = 1;
	for (int s = 0; s < 1000; s++) {
		if (status_counts[s]) {
			printf("%s\"%d\": %d", first ? "" : ", ", s, status_counts[s]);
			first = 0;
		}
	}
	printf("}, \"latencies_ms\": [");
	for (long i = 0; i < measured; i++) printf("%s%.4f", i ? ", " : "", latency[i]);
	printf("]}\n");
	mosquitto_destroy(m);
	mosquitto_lib_cleanup();
	return 0;
}
