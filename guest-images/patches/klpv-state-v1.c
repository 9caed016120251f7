// SPDX-License-Identifier: GPL-2.0
// Copyright (C) 2019 SUSE
/*
 * klpv-state-v1.c: the kernel's test_klp_state.c, version 1 of the
 * console_loglevel state, which does not support migration (see
 * klpv-state-v2.c).
 */
#define KLPV_STATE_VERSION 1
#include "klpv-state-v2.c"
