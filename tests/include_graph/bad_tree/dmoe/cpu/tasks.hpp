#pragma once
#include "moe_layer.hpp"
