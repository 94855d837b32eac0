/*
 * check.h - the checking macros of the C API test programs (tests/c/smoke.c, tests/c/buffers.c): CHECK
 * counts a failed condition, MUST stops the program on a failed call, EXPECT_STATUS wants a given code and
 * a message. Each program includes it once and reports `failures` at the end.
 */
#ifndef S2ATTN_TEST_CHECK_H
#define S2ATTN_TEST_CHECK_H

#include "s2attn.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int failures = 0;

#define CHECK(cond, ...)                                                   \
    do {                                                                   \
        if (!(cond)) {                                                     \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);           \
            fprintf(stderr, __VA_ARGS__);                                  \
            fprintf(stderr, " [last error: %s]\n", s2attn_last_error());   \
            failures++;                                                    \
        }                                                                  \
    } while (0)

/* A call that must succeed: stops the program otherwise, since later checks depend on it. */
#define MUST(call)                                                                              \
    do {                                                                                        \
        s2attn_status st_ = (call);                                                             \
        if (st_ != S2ATTN_OK) {                                                                 \
            fprintf(stderr, "FATAL %s:%d: %s returned %s: %s\n", __FILE__, __LINE__, #call,     \
                    s2attn_status_name(st_), s2attn_last_error());                              \
            exit(2);                                                                            \
        }                                                                                       \
    } while (0)

/* A call that must fail with `code` and leave a message. */
#define EXPECT_STATUS(code, call)                                                                      \
    do {                                                                                               \
        s2attn_status st_ = (call);                                                                    \
        CHECK(st_ == (code), "%s returned %s, expected %s", #call, s2attn_status_name(st_),            \
              s2attn_status_name(code));                                                               \
        CHECK(st_ == S2ATTN_OK || strlen(s2attn_last_error()) > 0, "%s left no error message", #call); \
    } while (0)

#endif /* S2ATTN_TEST_CHECK_H */
