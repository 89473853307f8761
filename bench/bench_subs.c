/* bench_subs.c - cost per publish of subscription matching with 10,000
 * subscriptions: the topic tree (topic_table_match, src/topic.c) against a
 * linear scan of every filter with topic_match() (what the first cut did).
 *
 * The subscriptions look like a busy gateway: 1,000 clients, each with ten
 * filters over 1,000 child devices ("dev/<child>/commands/#",
 * "dev/<child>/config", "dev/+/telemetry/<n>", a few "#"-style catch-alls).
 * Topics are published round-robin over realistic names. Prints nanoseconds
 * per publish for both, the median of RUNS runs (the machine is noisy).
 *
 * Usage: bench_subs [subscriptions] [publishes per run]
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "bench.h"
#include "topic.h"

#define RUNS 7

struct linear_sub {
    void *owner;
    uint8_t qos;
    char *filter;
    size_t len;
};

static size_t matches;

static void count_cb(void *arg, void *owner, uint8_t qos)
{
    (void)arg;
    (void)owner;
    (void)qos;
    matches++;
}

/* The linear scan the tree replaces: every filter, every publish, with the
 * same "one delivery per owner at the highest QoS" rule (owners adjacent). */
static void linear_match(const struct linear_sub *subs, size_t count, const char *topic,
                         size_t topic_len)
{
    size_t i = 0;

    while (i < count) {
        void *owner = subs[i].owner;
        int best = -1;
        for (; i < count && subs[i].owner == owner; i++)
            if (subs[i].qos > best && topic_match(subs[i].filter, subs[i].len, topic, topic_len))
                best = subs[i].qos;
        if (best >= 0)
            count_cb(NULL, owner, (uint8_t)best);
    }
}

static void make_filter(char *buf, size_t cap, size_t i)
{
    size_t child = (i * 7919) % 1000;

    switch (i % 10) {
    case 0:
    case 1:
    case 2:
        snprintf(buf, cap, "dev/modbus-%zu/commands/#", child);
        break;
    case 3:
    case 4:
        snprintf(buf, cap, "dev/modbus-%zu/config", child);
        break;
    case 5:
    case 6:
        snprintf(buf, cap, "dev/+/telemetry/ch%zu", child % 50);
        break;
    case 7:
        snprintf(buf, cap, "cloud/c8y/s/ds/%zu", child);
        break;
    case 8:
        snprintf(buf, cap, "uplinkd/+/status/%zu", child);
        break;
    default:
        snprintf(buf, cap, i % 1000 == 9 ? "#" : "dev/modbus-%zu/+/+", child);
        break;
    }
}

static void make_topic(char *buf, size_t cap, size_t i)
{
    size_t child = (i * 31) % 1000;

    switch (i % 4) {
    case 0:
        snprintf(buf, cap, "dev/modbus-%zu/telemetry/ch%zu", child, i % 60);
        break;
    case 1:
        snprintf(buf, cap, "dev/modbus-%zu/commands/reboot", child);
        break;
    case 2:
        snprintf(buf, cap, "dev/modbus-%zu/config", child);
        break;
    default:
        snprintf(buf, cap, "uplinkd/cloud/status/%zu", child);
        break;
    }
}

int main(int argc, char **argv)
{
    size_t nsubs = argc > 1 ? strtoul(argv[1], NULL, 10) : 10000;
    size_t npub = argc > 2 ? strtoul(argv[2], NULL, 10) : 20000;
    struct topic_table table = {0};
    struct linear_sub *linear = calloc(nsubs, sizeof(*linear));
    char(*topics)[96] = calloc(npub, sizeof(*topics));
    uint64_t tree_ns[RUNS], linear_ns[RUNS];
    size_t tree_matches = 0, linear_matches = 0;

    if (!linear || !topics)
        return 1;
    for (size_t i = 0; i < nsubs; i++) {
        char filter[96];
        void *owner = (void *)(uintptr_t)(1 + i / 10); /* 10 filters per client */

        make_filter(filter, sizeof(filter), i);
        if (topic_table_add(&table, owner, filter, strlen(filter), (uint8_t)(i % 3), NULL) < 0)
            return 1;
        linear[i].owner = owner;
        linear[i].qos = (uint8_t)(i % 3);
        linear[i].filter = strdup(filter);
        linear[i].len = strlen(filter);
    }
    for (size_t i = 0; i < npub; i++)
        make_topic(topics[i], sizeof(topics[i]), i);

    for (int run = 0; run < RUNS; run++) {
        uint64_t t0;

        matches = 0;
        t0 = bench_now_ns();
        for (size_t i = 0; i < npub; i++)
            topic_table_match(&table, topics[i], strlen(topics[i]), count_cb, NULL);
        tree_ns[run] = (bench_now_ns() - t0) / npub;
        tree_matches = matches;

        matches = 0;
        t0 = bench_now_ns();
        for (size_t i = 0; i < npub / 10; i++) /* 10x fewer: it is slow */
            linear_match(linear, nsubs, topics[i], strlen(topics[i]));
        linear_ns[run] = (bench_now_ns() - t0) / (npub / 10);
        linear_matches = matches;
    }
    qsort(tree_ns, RUNS, sizeof(tree_ns[0]), bench_cmp_u64);
    qsort(linear_ns, RUNS, sizeof(linear_ns[0]), bench_cmp_u64);
    printf("subscriptions: %zu (%zu owners), publishes per run: %zu tree / %zu linear, runs: %d\n",
           nsubs, (nsubs + 9) / 10, npub, npub / 10, RUNS);
    printf("deliveries per publish: tree %.2f, linear %.2f\n", (double)tree_matches / npub,
           (double)linear_matches / (npub / 10));
    printf("topic tree:  median %llu ns/publish (min %llu, max %llu)\n",
           (unsigned long long)tree_ns[RUNS / 2], (unsigned long long)tree_ns[0],
           (unsigned long long)tree_ns[RUNS - 1]);
    printf("linear scan: median %llu ns/publish (min %llu, max %llu)\n",
           (unsigned long long)linear_ns[RUNS / 2], (unsigned long long)linear_ns[0],
           (unsigned long long)linear_ns[RUNS - 1]);
    printf("speed-up: %.1fx\n", (double)linear_ns[RUNS / 2] / (double)tree_ns[RUNS / 2]);
    topic_table_deinit(&table);
    for (size_t i = 0; i < nsubs; i++)
        free(linear[i].filter);
    free(linear);
    free(topics);
    return 0;
}
