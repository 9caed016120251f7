// SPDX-License-Identifier: GPL-2.0
// Copyright (C) 2019 SUSE
/*
 * klpv-state-v3.c: the kernel's test_klp_state3.c: the console loglevel
 * fix is the same in the next cumulative patch, which takes it over from
 * klpv-state-v2 (see there).
 */
#include "klpv-state-v2.c"
