/* fuzz_session.c - libFuzzer target for the local server's per-client state
 * machine (src/local*.c), fed through the socket-less seam in local.h
 * (local_test_client_*). Several clients share one server, so sessions,
 * takeover, subscriptions, retained messages, queues and QoS 2 state all
 * interact. The daemon's limits are set low so the fuzzer reaches them.
 *
 * Input: a sequence of commands. Each starts with one byte: the low two bits
 * pick a client slot, bits 2..3 the action:
 *   0: the next byte is a length N; feed N following bytes to the client
 *      (opening it first if the slot is empty),
 *   1: the connection is lost (as when the socket breaks),
 *   2: run the loop once (close callbacks, timers due),
 *   3: drop the output the client has been sent so far.
 * Build: -Dfuzz=true (see fuzz/meson.build).
 */
#include <stdlib.h>
#include <string.h>
#include <uv.h>

#include "conf.h"
#include "local.h"
#include "log.h"

#define SLOTS 4

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct conf *fuzz_conf(void)
{
    static struct conf conf;
    conf.state_dir = NULL; /* no retained store: nothing touches the disk */
    conf.local.max_packet_size = 4096;
    conf.local.max_clients = 8;
    conf.local.max_inflight = 4;
    conf.local.max_queued = 8;
    conf.local.max_queued_bytes = 16384;
    return &conf;
}

static void done_cb(void *arg)
{
    *(int *)arg = 1;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static int log_ready;
    struct local_client *slots[SLOTS] = {NULL};
    struct local *local;
    uv_loop_t loop;
    size_t off = 0;
    int done = 0;

    if (!log_ready) {
        log_init(-1); /* nothing is logged: the fuzzer must be fast */
        log_ready = 1;
    }
    if (uv_loop_init(&loop) < 0)
        return 0;
    if (local_new(&loop, fuzz_conf(), NULL, &local) < 0)
        abort();
    while (off < size) {
        uint8_t cmd = data[off++];
        unsigned slot = cmd & 3, action = (cmd >> 2) & 3;
        size_t len;

        if (slots[slot] && local_test_client_closing(slots[slot]))
            slots[slot] = NULL; /* freed by the next loop run: forget it */
        switch (action) {
        case 0:
            if (off >= size)
                break;
            len = data[off++];
            if (len > size - off)
                len = size - off;
            if (!slots[slot] && local_test_client_new(local, &slots[slot]) < 0)
                slots[slot] = NULL;
            if (slots[slot])
                local_test_client_input(slots[slot], data + off, len);
            off += len;
            break;
        case 1:
            if (slots[slot])
                local_test_client_lose(slots[slot]);
            slots[slot] = NULL;
            break;
        case 2:
            for (unsigned i = 0; i < SLOTS; i++)
                if (slots[i] && local_test_client_closing(slots[i]))
                    slots[i] = NULL;
            uv_run(&loop, UV_RUN_NOWAIT);
            break;
        case 3:
            if (slots[slot])
                local_test_client_output(slots[slot], NULL, NULL);
            break;
        }
    }
    local_close(local, done_cb, &done);
    for (int i = 0; i < 100 && !done; i++)
        uv_run(&loop, UV_RUN_NOWAIT);
    if (!done)
        abort(); /* every handle must close */
    local_free(local);
    if (uv_loop_close(&loop) < 0)
        abort();
    return 0;
}
