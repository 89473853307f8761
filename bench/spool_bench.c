/* spool_bench.c - publisher + upstream subscriber for bench/run.
 *
 * One process plays both ends so the clock is shared: a libmosquitto
 * publisher sends QoS 1 messages of --size bytes (the first 16 carry a
 * sequence number and the CLOCK_MONOTONIC send time) to --pub-host/--pub-port,
 * and a QoS 0 subscriber on --sub-host/--sub-port counts what arrives on
 * --sub-topic and measures the latency from publish to receipt.
 *
 *   burst:  --count N            publish N as fast as the window allows
 *   steady: --rate R --seconds S publish R msgs/s for S seconds
 *   drain:  --count N --no-pub   only count N arrivals (a backlog draining)
 *
 * Prints one line of key=value pairs. A benchmark tool, not daemon code:
 * it uses libmosquitto's own threads.
 */
#include <errno.h>
#include <getopt.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include <mosquitto.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cond = PTHREAD_COND_INITIALIZER;
static uint64_t received, acked, first_rx_ns, last_rx_ns;
static uint64_t *latencies;
static size_t latency_count, latency_cap;
static bool sub_ready;

static void sub_connect_cb(struct mosquitto *mosq, void *obj, int rc)
{
    mosquitto_subscribe(mosq, NULL, (const char *)obj, 0);
}

static void sub_subscribe_cb(struct mosquitto *mosq, void *obj, int mid, int count,
                             const int *granted)
{
    pthread_mutex_lock(&lock);
    sub_ready = true;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static void sub_message_cb(struct mosquitto *mosq, void *obj, const struct mosquitto_message *m)
{
    uint64_t t = now_ns(), sent = 0;

    if (m->payloadlen >= 16)
        memcpy(&sent, (const char *)m->payload + 8, 8);
    pthread_mutex_lock(&lock);
    if (received == 0)
        first_rx_ns = t;
    last_rx_ns = t;
    received++;
    if (sent && latency_count < latency_cap)
        latencies[latency_count++] = t - sent;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static void pub_publish_cb(struct mosquitto *mosq, void *obj, int mid)
{
    pthread_mutex_lock(&lock);
    acked++;
    pthread_cond_broadcast(&cond);
    pthread_mutex_unlock(&lock);
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

static struct mosquitto *client(const char *id, const char *host, int port, const char *ca,
                                void *obj, int window)
{
    struct mosquitto *m = mosquitto_new(id, true, obj);
    if (!m) {
        perror("mosquitto_new");
        exit(2);
    }
    if (ca && mosquitto_tls_set(m, ca, NULL, NULL, NULL, NULL) != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "tls_set failed\n");
        exit(2);
    }
    mosquitto_int_option(m, MOSQ_OPT_TCP_NODELAY, 1);
    /* Before connecting: libmosquitto sets its send quota at CONNECT. */
    mosquitto_max_inflight_messages_set(m, (unsigned)window);
    if (mosquitto_connect(m, host, port, 60) != MOSQ_ERR_SUCCESS) {
        fprintf(stderr, "cannot connect to %s:%d\n", host, port);
        exit(2);
    }
    return m;
}

int main(int argc, char **argv)
{
    const char *pub_host = "127.0.0.1", *sub_host = "127.0.0.1", *pub_ca = NULL, *sub_ca = NULL;
    const char *pub_topic = "dev/bench/telemetry", *sub_topic = "#";
    int pub_port = 1883, sub_port = 1883, window = 1000, size = 100;
    long count = 100000, rate = 0, seconds = 0;
    bool no_pub = false, no_sub = false;
    double timeout_s = 300;
    static const struct option options[] = {
        {"pub-host", required_argument, NULL, 'a'},
        {"pub-port", required_argument, NULL, 'p'},
        {"sub-host", required_argument, NULL, 'b'},
        {"sub-port", required_argument, NULL, 'q'},
        {"pub-ca", required_argument, NULL, 'c'},
        {"sub-ca", required_argument, NULL, 'd'},
        {"pub-topic", required_argument, NULL, 't'},
        {"sub-topic", required_argument, NULL, 'u'},
        {"count", required_argument, NULL, 'n'},
        {"rate", required_argument, NULL, 'r'},
        {"seconds", required_argument, NULL, 's'},
        {"window", required_argument, NULL, 'w'},
        {"size", required_argument, NULL, 'z'},
        {"no-pub", no_argument, NULL, 'N'},
        {"no-sub", no_argument, NULL, 'M'},
        {"timeout", required_argument, NULL, 'T'},
        {NULL, 0, NULL, 0},
    };
    int opt;

    while ((opt = getopt_long(argc, argv, "", options, NULL)) != -1) {
        switch (opt) {
        case 'a':
            pub_host = optarg;
            break;
        case 'p':
            pub_port = atoi(optarg);
            break;
        case 'b':
            sub_host = optarg;
            break;
        case 'q':
            sub_port = atoi(optarg);
            break;
        case 'c':
            pub_ca = optarg;
            break;
        case 'd':
            sub_ca = optarg;
            break;
        case 't':
            pub_topic = optarg;
            break;
        case 'u':
            sub_topic = optarg;
            break;
        case 'n':
            count = atol(optarg);
            break;
        case 'r':
            rate = atol(optarg);
            break;
        case 's':
            seconds = atol(optarg);
            break;
        case 'w':
            window = atoi(optarg);
            break;
        case 'z':
            size = atoi(optarg);
            break;
        case 'N':
            no_pub = true;
            break;
        case 'M':
            no_sub = true;
            break;
        case 'T':
            timeout_s = atof(optarg);
            break;
        default:
            fprintf(stderr, "usage: see the top of bench/spool_bench.c\n");
            return 2;
        }
    }
    if (rate > 0)
        count = rate * seconds;
    if (size < 16)
        size = 16;
    latency_cap = (size_t)count;
    latencies = calloc(latency_cap ? latency_cap : 1, sizeof(*latencies));
    mosquitto_lib_init();

    struct mosquitto *sub = NULL, *pub = NULL;
    if (!no_sub) {
        sub = client("bench-sub", sub_host, sub_port, sub_ca, (void *)sub_topic, 20);
        mosquitto_connect_callback_set(sub, sub_connect_cb);
        mosquitto_subscribe_callback_set(sub, sub_subscribe_cb);
        mosquitto_message_callback_set(sub, sub_message_cb);
        mosquitto_subscribe(sub, NULL, sub_topic, 0);
        mosquitto_loop_start(sub);
        pthread_mutex_lock(&lock);
        while (!sub_ready)
            pthread_cond_wait(&cond, &lock);
        pthread_mutex_unlock(&lock);
    }
    uint64_t t0 = now_ns(), t_pub_end = t0;
    if (!no_pub) {
        pub = client("bench-pub", pub_host, pub_port, pub_ca, NULL, window);
        mosquitto_publish_callback_set(pub, pub_publish_cb);
        mosquitto_loop_start(pub);
        char *payload = calloc(1, (size_t)size);
        t0 = now_ns();
        for (long i = 0; i < count; i++) {
            if (rate > 0) {
                uint64_t due = t0 + (uint64_t)i * 1000000000ull / (uint64_t)rate;
                uint64_t t;
                while ((t = now_ns()) < due) {
                    struct timespec ts = {0, (long)(due - t)};
                    nanosleep(&ts, NULL);
                }
            } else {
                /* Keep at most `window` unacknowledged: libmosquitto would
                 * queue the rest in memory anyway. */
                pthread_mutex_lock(&lock);
                while ((uint64_t)i - acked >= (uint64_t)window)
                    pthread_cond_wait(&cond, &lock);
                pthread_mutex_unlock(&lock);
            }
            uint64_t seq = (uint64_t)i, t = now_ns();
            memcpy(payload, &seq, 8);
            memcpy(payload + 8, &t, 8);
            int rc = mosquitto_publish(pub, NULL, pub_topic, size, payload, 1, false);
            if (rc != MOSQ_ERR_SUCCESS) {
                fprintf(stderr, "publish: %s\n", mosquitto_strerror(rc));
                return 1;
            }
        }
        pthread_mutex_lock(&lock);
        while (acked < (uint64_t)count)
            pthread_cond_wait(&cond, &lock);
        pthread_mutex_unlock(&lock);
        t_pub_end = now_ns();
        free(payload);
    }
    if (!no_sub) {
        struct timespec deadline;
        clock_gettime(CLOCK_REALTIME, &deadline);
        deadline.tv_sec += (time_t)timeout_s;
        pthread_mutex_lock(&lock);
        while (received < (uint64_t)count) {
            if (pthread_cond_timedwait(&cond, &lock, &deadline) == ETIMEDOUT)
                break;
        }
        pthread_mutex_unlock(&lock);
    }
    uint64_t end = no_sub ? t_pub_end : last_rx_ns;
    uint64_t start = no_pub ? first_rx_ns : t0;
    double secs = (double)(end - start) / 1e9;
    printf("count=%ld received=%llu acked=%llu seconds=%.3f msgs_per_s=%.0f", count,
           (unsigned long long)received, (unsigned long long)acked, secs,
           secs > 0 ? (double)(no_sub ? acked : received) / secs : 0.0);
    if (!no_pub)
        printf(" pub_acked_per_s=%.0f", (double)acked / ((double)(t_pub_end - t0) / 1e9));
    if (latency_count) {
        qsort(latencies, latency_count, sizeof(*latencies), cmp_u64);
        printf(" p50_ms=%.3f p99_ms=%.3f max_ms=%.3f", (double)latencies[latency_count / 2] / 1e6,
               (double)latencies[latency_count * 99 / 100] / 1e6,
               (double)latencies[latency_count - 1] / 1e6);
    }
    printf("\n");
    if (pub) {
        mosquitto_disconnect(pub);
        mosquitto_loop_stop(pub, false);
        mosquitto_destroy(pub);
    }
    if (sub) {
        mosquitto_disconnect(sub);
        mosquitto_loop_stop(sub, false);
        mosquitto_destroy(sub);
    }
    mosquitto_lib_cleanup();
    free(latencies);
    return received < (uint64_t)count && !no_sub ? 1 : 0;
}
