// monitor-events' subscription to one resource group's Resource Manager events: only successful
// writes, deletes and actions on scale sets and their instances (design §2), and on virtual
// machines — a Flexible scale set's instances are plain VMs (the trailing `/` keeps
// `virtualMachineScaleSets` apart).
param systemTopicName string
param destination object

resource systemTopic 'Microsoft.EventGrid/systemTopics@2022-06-15' existing = {
  name: systemTopicName
}

resource subscription 'Microsoft.EventGrid/systemTopics/eventSubscriptions@2022-06-15' = {
  parent: systemTopic
  name: 'monitor-events'
  properties: {
    destination: destination
    eventDeliverySchema: 'EventGridSchema'
    filter: {
      includedEventTypes: [
        'Microsoft.Resources.ResourceWriteSuccess'
        'Microsoft.Resources.ResourceDeleteSuccess'
        'Microsoft.Resources.ResourceActionSuccess'
      ]
      advancedFilters: [
        {
          operatorType: 'StringBeginsWith'
          key: 'data.operationName'
          values: ['Microsoft.Compute/virtualMachineScaleSets', 'Microsoft.Compute/virtualMachines/']
        }
      ]
    }
    // A missed RM event costs at most one full-resync interval (HEALER_FULL_RESYNC); retry for a day.
    retryPolicy: { maxDeliveryAttempts: 30, eventTimeToLiveInMinutes: 1440 }
  }
}
