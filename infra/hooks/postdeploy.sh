#!/usr/bin/env bash
# azd postdeploy: the event subscriptions of infra/subscriptions.bicep, from the values azd keeps
# of main.bicep's outputs.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
: "${AZURE_RESOURCE_GROUP:?run through azd (azd up / azd deploy)}"
az deployment group create \
    --resource-group "$AZURE_RESOURCE_GROUP" \
    --name vmss-healer-subscriptions \
    --template-file infra/subscriptions.bicep \
    --parameters functionAppName="$FUNCTION_APP_NAME" \
        heartbeatTopicName="$HEARTBEAT_TOPIC_NAME" \
        storageAccountName="$STORAGE_ACCOUNT_NAME" \
        systemTopics="$SYSTEM_TOPICS"
echo "monitor-events subscribed to $HEARTBEAT_TOPIC_NAME and the watched resource groups' Resource Manager events"
